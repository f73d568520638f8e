"""Prompt -> text-encoder embeddings, behind a hook that a prompt-weighting layer can replace.

The Generator never passes prompt text to a pipeline; it asks a `PromptEncoder` for embeddings and passes those.
The default is `sdtune.prompts.WeightedPromptEncoder` (A1111/compel weights, long prompts, prompt editing, AND,
embeddings by name); `encode_with_pipeline` is diffusers' own `pipe.encode_prompt` (plain text, 77 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass
class PromptEmbeds:
    """Conditioning for one batch. pooled_* are SDXL's extra pooled text embeddings (None for SD1/SD2)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    guidance: Any = None  # a `generate.guidance.GuidanceSchedule` when conditioning changes per step / uses AND

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """Pipeline keyword arguments; absent parts are left out so SD1/SD2 pipelines accept them too."""
        return {k: v for k, v in vars(self).items() if v is not None and k != "guidance"}

    def with_negative_of(self, other: "PromptEmbeds") -> "PromptEmbeds":
        """These positive embeddings with `other`'s negative ones (the negative prompt encoded under a network
        that is active in the unconditional pass only; see `generate.negative_pass`)."""
        from dataclasses import replace

        guidance = self.guidance
        if guidance is not None and other.guidance is not None:
            guidance = replace(guidance, uncond=other.guidance.uncond)
        return replace(self, negative_prompt_embeds=other.negative_prompt_embeds,
                       negative_pooled_prompt_embeds=other.negative_pooled_prompt_embeds, guidance=guidance)


class PromptEncoder(Protocol):
    """Encode `prompt`/`negative_prompt` for `pipe`, repeated `num_images` times.

    clip_skip uses A1111's numbering (1 = last layer). do_cfg False means no negative embeddings are needed.
    steps (for prompt editing), prompt_syntax ("auto", "a1111", "compel") and emphasis ("auto", "original",
    "none", "compel") are passed as keywords; an encoder without those features may ignore them."""

    def __call__(self, pipe: Any, prompt: str, negative_prompt: str, *, num_images: int, do_cfg: bool,
                 clip_skip: int, steps: int = 20, prompt_syntax: str = "auto", emphasis: str = "auto") -> Any: ...


def encode_with_pipeline(pipe: Any, prompt: str, negative_prompt: str, *, num_images: int, do_cfg: bool,
                         clip_skip: int, **_options: Any) -> PromptEmbeds:
    """diffusers' own `encode_prompt` (plain text, 77-token truncation, no weights; other options are ignored).

    An empty negative prompt is passed as None so SDXL applies its `force_zeros_for_empty_prompt` convention."""
    kwargs = dict(
        device=pipe._execution_device,
        num_images_per_prompt=num_images,
        do_classifier_free_guidance=do_cfg,
        negative_prompt=negative_prompt or None,
        clip_skip=clip_skip - 1 if clip_skip > 1 else None,  # diffusers counts layers skipped after the last
    )
    import torch

    with torch.no_grad():
        out = pipe.encode_prompt(prompt, **kwargs)
    if len(out) == 4:  # SDXL base and refiner
        return PromptEmbeds(*out)
    return PromptEmbeds(out[0], out[1])
