"""Finding the LoRA-able components of a pipeline / LoadedModel / dict, their family, and PEFT LoRA layers."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from sdtune.adapters.lora import keys as K
from sdtune.errors import SdtuneError


def _unwrap(model: Any) -> Any:
    """A PeftModel's underlying model (diffusers' add_adapter models are not wrapped)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    if inner is not None and type(model).__name__.startswith("Peft"):
        return inner
    return model


def components_of(obj: Any) -> dict[str, Any]:
    """{unet, text_encoder, text_encoder_2} present in a pipeline, LoadedModel, dict, or a single model."""
    if hasattr(obj, "pipe") and hasattr(obj, "family"):  # LoadedModel
        obj = obj.pipe
    comps = getattr(obj, "components", None)
    if isinstance(obj, Mapping):
        comps = obj
    if isinstance(comps, Mapping):
        return {c: comps[c] for c in K.COMPONENTS if comps.get(c) is not None}
    if isinstance(obj, torch.nn.Module):
        model = _unwrap(obj)
        cls = type(model).__name__
        if "UNet" in cls:
            return {"unet": obj}
        if cls == "CLIPTextModelWithProjection":
            return {"text_encoder_2": obj}
        if cls.startswith("CLIPText"):
            return {"text_encoder": obj}
        raise SdtuneError(f"cannot tell which part of a pipeline a {cls} is; pass a dict such as {{'unet': model}}")
    raise SdtuneError(f"expected a pipeline, LoadedModel, dict of components or a model, got {type(obj).__name__}")


def guess_family(obj: Any) -> str | None:
    """sd1/sd2/sdxl/sdxl-refiner from a LoadedModel's family or from the components' structure."""
    fam = getattr(obj, "family", None)
    if isinstance(fam, str):
        return fam
    from sdtune.models.family import family_of_components

    return family_of_components({k: _unwrap(v) for k, v in components_of(obj).items()})


def unet_layout_of(obj: Any) -> dict[str, Any] | None:
    unet = components_of(obj).get("unet")
    return K.unet_layout(_unwrap(unet).config) if unet is not None else None


LoraTarget = torch.nn.Linear | torch.nn.Conv2d  # a layer a LoRA module can sit on


def target_modules(obj: Any) -> dict[str, LoraTarget]:
    """Canonical name -> Linear/Conv2d module (the base layer when PEFT wrapped it) for every LoRA-able module."""
    out: dict[str, LoraTarget] = {}
    for comp, model in components_of(obj).items():
        root = _unwrap(model)
        for name, mod in root.named_modules():
            if name.endswith(".base_layer") or ".lora_" in name or name.startswith("lora_"):
                continue
            base = getattr(mod, "base_layer", mod)
            if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                canon = f"{comp}.{K.canonical_path(comp, root, name)}"
                out[canon] = base
    return out


def lora_layers(obj: Any, adapter: str | None = None) -> Iterator[tuple[str, Any, str]]:
    """(canonical name, PEFT LoraLayer, adapter name) for every PEFT LoRA layer (of `adapter` if given)."""
    from peft.tuners.lora import LoraLayer

    for comp, model in components_of(obj).items():
        root = _unwrap(model)
        for name, mod in root.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            canon = f"{comp}.{K.canonical_path(comp, root, name)}"
            for a in mod.lora_A.keys():
                if adapter is None or a == adapter:
                    yield canon, mod, a


def adapter_names(obj: Any) -> list[str]:
    return sorted({a for _, _, a in lora_layers(obj)})


def pick_adapter(obj: Any, adapter: str | None) -> str:
    names = adapter_names(obj)
    if adapter is not None:
        if adapter not in names:
            raise SdtuneError(f"no PEFT LoRA adapter named {adapter!r} (found: {', '.join(names) or 'none'})")
        return adapter
    if len(names) != 1:
        raise SdtuneError(f"{'no' if not names else 'several'} PEFT LoRA adapters found "
                          f"({', '.join(names) or 'none'}); pass adapter_name=")
    return names[0]
