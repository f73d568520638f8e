"""Bake LoRAs into a model's weights: W <- W + sum_i weight_i * delta_i (computed in float32, stored in W's dtype).

Used by `sdtune merge`; the result is an ordinary model (diffusers folder or single-file checkpoint) that needs no
LoRA support to load. Modules are matched and checked exactly as for applying (family, names, shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from sdtune.adapters.lora.apply import LoraSpec, check_compatible, parse_lora_specs
from sdtune.adapters.lora.models import guess_family, target_modules, unet_layout_of
from sdtune.adapters.lora.network import LoraNetwork


@dataclass
class MergedLora:
    name: str
    weight: float
    modules: int
    hash: str | None


def merge_loras(pipe_or_components: Any, loras: Iterable[LoraSpec], *, family: str | None = None,
                model_name: str | None = None) -> list[MergedLora]:
    """Add each LoRA's delta times its weight to the model's weights, in place. All LoRAs are read and checked
    before any weight changes, so a bad file leaves the model untouched."""
    from sdtune.adapters.lora.io import read_lora
    from sdtune.adapters.lora.tags import lora_short_hash

    family = family or guess_family(pipe_or_components)
    modules = target_modules(pipe_or_components)
    layout = unet_layout_of(pipe_or_components)
    name = model_name or getattr(pipe_or_components, "name", None) or "the model"
    todo: list[tuple[LoraNetwork, float, MergedLora]] = []
    for src, weight in parse_lora_specs(loras):
        if isinstance(src, LoraNetwork):
            net, label, h = src, Path(src.source).stem if src.source else "lora", None
        else:
            net = read_lora(src, layout=layout, expect_family=family, model_name=name)
            label, h = Path(src).stem, lora_short_hash(src)
        check_compatible(net, family, modules, name)
        todo.append((net, weight, MergedLora(label, weight, len(net.all_modules()), h)))
    with torch.no_grad():
        for net, weight, _ in todo:
            if weight == 0:
                continue
            for mod_name, m in net.all_modules().items():
                w = modules[mod_name].weight
                delta = m.delta(torch.float32).reshape(w.shape).to(w.device)
                w.copy_((w.float() + weight * delta).to(w.dtype))
    return [info for _, _, info in todo]
