"""`lora`: a LoRA on the UNet's attention projections (to_q, to_k, to_v, to_out.0 by default), trained with peft.

Files are written by `sdtune.adapters.lora.save_lora`: kohya layout by default (A1111, ComfyUI, kohya and diffusers
read it), or the diffusers/PEFT layout (`format = "diffusers"`). Without that package the diffusers layout
(`unet.<module>.lora_A.weight` / `lora_B.weight`, rank and alpha in `ss_network_dim`/`ss_network_alpha`) is
written directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.training.config import opt
from sdtune.training.methods.base import TrainingMethod, trainable

if TYPE_CHECKING:
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER = "sdtune"


@dataclass
class LoraOptions:
    rank: int = opt(4, "LoRA rank (dimension).", section="lora", kind="int")
    alpha: float | None = opt(None, "LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank).",
                              section="lora", kind="float")
    dropout: float = opt(0.0, "Dropout on the LoRA input.", section="lora", kind="float")
    targets: list[str] = opt(list(DEFAULT_TARGETS), "UNet module names (suffixes) that get a LoRA.",
                             section="lora", kind="strs", metavar="NAME")
    format: str = opt("kohya", "File layout: kohya (A1111/ComfyUI/kohya/diffusers) or diffusers (PEFT keys).",
                      section="lora", kind="str", choices=("kohya", "diffusers"))


class LoraMethod(TrainingMethod):
    name = "lora"
    summary = "LoRA on the UNet attention layers (peft)."
    Options = LoraOptions

    @classmethod
    def check_options(cls, options: Any, config: TrainConfig) -> None:
        if options.rank < 1:
            raise SdtuneError(f"lora rank {options.rank} must be at least 1 (4-32 is typical)")
        if options.alpha is not None and options.alpha <= 0:
            raise SdtuneError(f"lora alpha {options.alpha} must be > 0 (default: the rank)")
        if not 0 <= options.dropout < 1:
            raise SdtuneError(f"lora dropout {options.dropout} must be in [0, 1)")
        if not options.targets:
            raise SdtuneError("lora targets is empty; use e.g. to_q to_k to_v to_out.0")

    @property
    def alpha(self) -> float:
        return float(self.options.alpha if self.options.alpha is not None else self.options.rank)

    def setup(self, model: LoadedModel, config: TrainConfig) -> list[dict[str, Any]]:
        from peft import LoraConfig

        self.model, self.config = model, config
        unet = model.pipe.unet
        names = {n for n, _ in unet.named_modules()}
        missing = [t for t in self.options.targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise SdtuneError(f"lora targets {', '.join(missing)} match no UNet module; use names such as "
                              f"{', '.join(DEFAULT_TARGETS)}")
        unet.add_adapter(LoraConfig(r=self.options.rank, lora_alpha=self.alpha, lora_dropout=self.options.dropout,
                                    target_modules=list(self.options.targets), init_lora_weights=True),
                         adapter_name=ADAPTER)
        params = trainable(unet.parameters())
        return [{"params": params}]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        assert self.model is not None
        sd = get_peft_model_state_dict(self.model.pipe.unet, adapter_name=ADAPTER)
        return {k: v.detach() for k, v in sd.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        assert self.model is not None
        expected = set(self.state_dict())
        if set(state) != expected:
            raise SdtuneError(f"saved LoRA weights do not match this LoRA ({len(state)} tensors saved, "
                              f"{len(expected)} expected); were rank or targets changed?")
        unet = self.model.pipe.unet
        set_peft_model_state_dict(unet, dict(state), adapter_name=ADAPTER)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {f"unet.{k}": v for k, v in self.state_dict().items()}

    def metadata(self) -> dict[str, str]:
        return {"sdtune_lora_targets": json.dumps(list(self.options.targets))}

    def save(self, path: str | Path, step: int, metadata: Mapping[str, str]) -> Path:
        assert self.model is not None
        meta = {**dict(metadata), **self.metadata(), "sdtune_step": str(step)}
        try:
            from sdtune.adapters.lora import network_from_peft, save_lora
        except ImportError:  # the LoRA file package is absent: write the diffusers layout ourselves
            meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(self.options.rank),
                         "ss_network_alpha": f"{self.alpha:g}", "sdtune_format": "diffusers"})
            return super().save(path, step, meta)
        net = network_from_peft(self.model.pipe, ADAPTER, family=self.model.family)
        return save_lora(net, path, format=self.options.format, metadata=meta)
