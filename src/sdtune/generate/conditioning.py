"""Prompt -> text-encoder embeddings, behind a hook that a prompt-weighting layer can replace.

The Generator never passes prompt text to a pipeline; it asks a `PromptEncoder` for embeddings and passes those.
Today's encoder is diffusers' own `pipe.encode_prompt`; an A1111-style `(word:1.2)` parser only has to provide a
function with the same signature.
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

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """Pipeline keyword arguments; absent parts are left out so SD1/SD2 pipelines accept them too."""
        return {k: v for k, v in vars(self).items() if v is not None}


class PromptEncoder(Protocol):
    """Encode `prompt`/`negative_prompt` for `pipe`, repeated `num_images` times.

    clip_skip uses A1111's numbering (1 = last layer). do_cfg False means no negative embeddings are needed."""

    def __call__(self, pipe: Any, prompt: str, negative_prompt: str, *, num_images: int, do_cfg: bool,
                 clip_skip: int) -> PromptEmbeds: ...


def encode_with_pipeline(pipe: Any, prompt: str, negative_prompt: str, *, num_images: int, do_cfg: bool,
                         clip_skip: int) -> PromptEmbeds:
    """The default encoder: the pipeline's own `encode_prompt` (plain text, 77-token truncation, no weights).

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
