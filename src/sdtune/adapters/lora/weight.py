"""A LoRA's weight at generation: one number, or A1111's separate text-encoder and UNet multipliers
(`<lora:name:te:unet>`), as the LoRA stack (`apply.py`) applies it per component."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraWeight:
    """A LoRA's multipliers on the text encoder(s) and on the UNet: A1111's `<lora:name:te:unet>` (one number is
    both). Each component whose multiplier is 0 runs its base layers, bit for bit."""

    te: float
    unet: float

    @classmethod
    def of(cls, weight: "float | LoraWeight") -> "LoraWeight":
        return weight if isinstance(weight, LoraWeight) else cls(float(weight), float(weight))

    def on(self, component: str) -> float:
        """The multiplier of `component` ("unet", "text_encoder", "text_encoder_2")."""
        return self.unet if component == "unet" else self.te

    def __add__(self, other: "LoraWeight") -> "LoraWeight":  # one file twice: the weights add up, as in A1111
        return LoraWeight(self.te + other.te, self.unet + other.unet)

    def __bool__(self) -> bool:
        return self.te != 0 or self.unet != 0

    def __format__(self, spec: str) -> str:
        one = format(self.te, spec or "g")
        return one if self.te == self.unet else f"{one}:{format(self.unet, spec or 'g')}"
