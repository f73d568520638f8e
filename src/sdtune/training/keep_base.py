"""`--keep-base W`: keep the base model where the captions do not name the concept, without class images.

Why: the DreamBooth paper's prior preservation trains the class prompt toward the base model's images of *other*
pictures; measured on the toy world (docs/lora.md) it kept the base model (99% of its judge agreement) but the
concept was then learnt slowly and narrowly (the bare identifier 6-38% instead of 81%). Here every training image's
noisy latent is denoised a second time with its caption minus the identifier ("a red sks shape" -> "a red shape"),
or, every other time, with the empty prompt, and that prediction is trained toward the base model's own prediction
for the same noisy latent and text (distillation, as the hypernetwork's keep_uncond does for the empty prompt). The
inputs differ from the training ones only in the identifier, so what the run learns has to go through the
identifier; the empty prompt matters because classifier-free guidance extrapolates from it, so a change there moves
the image of every prompt. No class images are generated or stored.

A method that uses it provides `base_weights()`: a context manager inside which its live modules compute what the
base model computed (LoRA: adapters disabled; DreamBooth: the stored base weights swapped in).
Cost per step: one more forward pass without gradients and one more with them (measured: 2.1x the step time of
the README's LoRA command on the toy world, docs/lora.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch

from sdtune.errors import SdtuneError
from sdtune.training.identifier import auto_class_prompts, without_identifier

if TYPE_CHECKING:
    from sdtune.training.context import TrainingContext
    from sdtune.training.methods.base import Batch, DiffusionLoss, TrainingMethod


def check_keep_base(weight: float) -> None:
    if not weight >= 0 or weight != weight or weight > 100:
        raise SdtuneError(f"keep_base {weight} must be 0 (off) or a weight up to 100 (1 is typical)")


def keep_base_for(method: Any, ctx: TrainingContext, options: Any, prior_mode: str,
                  identifier: str | None) -> KeepBase | None:
    """The run's keep-base term (None when off). `identifier`: the prior's, if it found one. With every default
    (no prior, no keep-base, no pivotal word) and an identifier in the captions, one note says what keeps the rest
    of the model."""
    defaults = prior_mode == "off" and options.prior_preservation is None and not getattr(options, "pivotal", False)
    if not options.keep_base and not defaults:
        return None
    ident = identifier or auto_class_prompts(ctx, options, getattr(ctx.model.pipe, "tokenizer", None))[0]
    if not options.keep_base:
        if ident is not None:
            ctx.echo(f"note: prompts without {ident!r} may change too; --keep-base 1 keeps them (with --pivotal "
                     f"--pivotal-abstraction {ident} the concept is still learnt well: docs/lora.md)")
        return None
    if ident is None:
        raise SdtuneError(f"{method.name}: --keep-base needs the identifier, the word in every caption that names "
                          "the concept; none was found: pass --identifier WORD (e.g. sks)")
    ctx.echo(f"keep-base: the captions without {ident!r} are trained toward the base model's prediction, weight "
             f"{options.keep_base:g}")
    return KeepBase(method, ident, options.keep_base, method.base_weights)


class KeepBase:
    """The keep-base term of one run: `loss(batch, diffusion_loss)` per micro-batch."""

    def __init__(self, method: TrainingMethod, identifier: str, weight: float,
                 base_weights: Callable[[], ContextManager[Any]]) -> None:
        self.method = method
        self.identifier = identifier
        self.weight = float(weight)
        self.base_weights = base_weights

    def loss(self, batch: Batch, diffusion_loss: DiffusionLoss) -> torch.Tensor:
        method = self.method
        assert method.model is not None
        unet = method.model.pipe.unet
        # alternately the caption minus the identifier and the empty prompt: classifier-free guidance extrapolates
        # from the empty prompt's prediction, so a change there moves every prompt's image
        plain = replace(batch, captions=["" if (batch.step + i) % 2 else without_identifier(c, self.identifier)
                                         for i, c in enumerate(batch.captions)])
        with torch.no_grad(), self.base_weights():
            base_cond = method.conditioning(plain)
        # frozen text encoders: the live encoding is the base's (and comes from the same cache)
        cond = method.conditioning(plain) if method.trains_text_encoder else base_cond

        def base_prediction(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.base_weights():
                return unet(noisy, t, **base_cond.unet_kwargs()).sample

        return self.weight * diffusion_loss(batch.latents, cond, target=base_prediction)
