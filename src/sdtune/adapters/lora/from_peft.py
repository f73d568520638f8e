"""From trained PEFT LoRA layers to what the writers and the self-check take.

`network_from_peft(model)` turns PEFT LoRA layers (diffusers `unet.add_adapter(LoraConfig(...))`, peft's
`inject_adapter_in_model` on a text encoder, or a PeftModel) into a `LoraNetwork` for the writers.
`lora_deltas_from_peft(model)` gives the trained weight deltas {canonical module name: delta} computed by PEFT
itself (`get_delta_weight`), which `verify_lora_file` compares a reloaded file against.
"""

from __future__ import annotations

from typing import Any

import torch

from sdtune.adapters.lora.models import guess_family, lora_layers, pick_adapter, unet_layout_of
from sdtune.adapters.lora.network import LoraModule, LoraNetwork
from sdtune.errors import SdtuneError


def network_from_peft(obj: Any, adapter_name: str | None = None, *, family: str | None = None) -> LoraNetwork:
    """A `LoraNetwork` from the PEFT LoRA layers of a pipeline / dict of components / model.

    alpha is written so that alpha / rank equals PEFT's scaling (also for rsLoRA). DoRA, LoRA biases and embedding
    LoRAs have no kohya equivalent and are refused."""
    adapter = pick_adapter(obj, adapter_name)
    modules: dict[str, LoraModule] = {}
    for name, layer, a in lora_layers(obj, adapter):
        if getattr(layer, "use_dora", {}).get(a):
            raise SdtuneError(f"{name}: DoRA layers cannot be saved as kohya/diffusers LoRA")
        if getattr(layer, "lora_bias", {}).get(a):
            raise SdtuneError(f"{name}: LoRA biases cannot be saved as kohya LoRA; train with lora_bias=False")
        down = layer.lora_A[a].weight.detach()
        up = layer.lora_B[a].weight.detach()
        rank = int(down.shape[0])
        alpha = float(layer.scaling[a]) * rank
        modules[name] = LoraModule(down=down.to("cpu").clone(), up=up.to("cpu").clone(), alpha=alpha)
    if not modules:
        raise SdtuneError(f"adapter {adapter!r} has no LoRA layers")
    return LoraNetwork(modules=modules, family=family or guess_family(obj), unet_layout=unet_layout_of(obj),
                       metadata={})


def lora_deltas_from_peft(obj: Any, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """{canonical module name: weight delta (float32, CPU)} of a PEFT adapter, computed by PEFT."""
    adapter = pick_adapter(obj, adapter_name)
    return {name: layer.get_delta_weight(a).detach().float().cpu() for name, layer, a in lora_layers(obj, adapter)}
