"""Cheap inference speed-ups for a pipeline the generator owns (measured by `bench/generate_speed.py`).

* channels-last UNet weights: oneDNN (CPU) and cuDNN (fp16) pick faster convolution kernels for that layout;
* attention processors whose call signature is computed once: diffusers' `Attention.forward` runs
  `inspect.signature(processor.__call__)` on every call, about 6% of a step on the tiny model.

Only applied to models the generator loads itself: a model handed in (the trainer's) keeps its layout, so a
training run computes the same numbers whether or not it made sample images.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.cache
def _signature_cached_processor_class() -> type:
    from diffusers.models.attention_processor import AttnProcessor2_0

    class SignatureCachedAttnProcessor(AttnProcessor2_0):
        """`AttnProcessor2_0` with its signature precomputed (inspect reads `__signature__` first)."""

        def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            return super().__call__(*args, **kwargs)

        __call__.__signature__ = inspect.signature(AttnProcessor2_0.__call__)  # type: ignore[attr-defined]

    return SignatureCachedAttnProcessor


def optimize_for_inference(pipe: Any) -> None:
    """Channels-last UNet and signature-cached SDPA processors; numerics are those of the same kernels on the
    new layout (deterministic on one machine, as `--from-png` needs)."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return
    unet.to(memory_format=torch.channels_last)
    from diffusers.models.attention_processor import AttnProcessor2_0

    cls = _signature_cached_processor_class()
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is AttnProcessor2_0:
            module.processor = cls()
