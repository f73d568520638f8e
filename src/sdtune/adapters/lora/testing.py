"""Random LoRA networks for tests and size benchmarks, shaped after a model's layers (real or on the meta device)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from sdtune.adapters.lora.models import guess_family, target_modules, unet_layout_of
from sdtune.adapters.lora.network import LoraModule, LoraNetwork

# what diffusers' LoRA scripts target (attention projections) and what kohya's networks.lora targets
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
KOHYA_UNET = ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


def _matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def random_network(obj: Any, *, unet: Iterable[str] = ATTENTION, text: Iterable[str] = (), rank: int = 4,
                   conv_rank: int | None = None, alpha: float | None = None, seed: int = 0, scale: float = 0.1,
                   zeros: bool = False) -> LoraNetwork:
    """A LoRA for `obj`'s architecture: modules whose path ends in one of `unet` (UNet) or `text` (text encoders),
    factors ~ N(0, scale) (all zeros with `zeros`, e.g. for size measurements), alpha = rank/2 by default."""
    gen = torch.Generator().manual_seed(seed)
    unet, text = tuple(unet), tuple(text)
    modules: dict[str, LoraModule] = {}
    for name, mod in sorted(target_modules(obj).items()):
        comp, _, path = name.partition(".")
        if not _matches(path, unet if comp == "unet" else text):
            continue
        w = mod.weight
        conv = w.ndim == 4
        r = (conv_rank or rank) if conv and tuple(w.shape[2:]) != (1, 1) else rank
        down_shape = (r, *w.shape[1:]) if conv else (r, w.shape[1])
        up_shape = (w.shape[0], r, 1, 1) if conv else (w.shape[0], r)
        if zeros:
            down, up = torch.zeros(down_shape), torch.zeros(up_shape)
        else:
            down = torch.randn(down_shape, generator=gen) * scale
            up = torch.randn(up_shape, generator=gen) * scale
        modules[name] = LoraModule(down=down, up=up, alpha=float(alpha if alpha is not None else r / 2))
    return LoraNetwork(modules=modules, family=guess_family(obj), unet_layout=unet_layout_of(obj))
