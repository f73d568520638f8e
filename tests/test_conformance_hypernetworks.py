"""Conformance: hypernetworks sdtune writes (`save_hypernetwork`, which `train hypernetwork` and `convert` use)
against A1111's and ComfyUI's loading rules, stated as data in our own words, for the widths of SD1, SD2 and SDXL.

Sources (read for this test; no code copied):
- A1111 = AUTOMATIC1111/stable-diffusion-webui v1.10, modules/hypernetworks/hypernetwork.py: list_hypernetworks
  (files `**/*.pt`, name = stem, "None" skipped), Hypernetwork.load (int keys are context widths, each a pair of
  module state dicts; settings from layer_structure, activation_func, is_layer_norm, dropout_structure /
  use_dropout, activate_output (True when absent)), HypernetworkModule (a Sequential: per layer a Linear, then the
  activation unless it is the last layer and activate_output is off, then a LayerNorm, then a Dropout where the
  dropout structure is > 0; loaded strictly). The pickle whitelist: tests/test_interop_a1111_pickles.py.
- ComfyUI = Comfy-Org/ComfyUI comfy_extras/nodes_hypernetwork.py load_hypernetwork_patch: torch.load with
  weights_only; activations it knows (others: "Unsupported Hypernetwork format", nothing applied); per int key,
  the `.weight` entries of each module dict in stored order, a Linear each, followed by a LayerNorm entry when
  is_layer_norm; its swish is Hardswish as in A1111.
- diffusers and kohya have no hypernetwork loader: n/a.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sdtune.adapters.hypernetwork.io import save_hypernetwork
from sdtune.adapters.hypernetwork.network import Hypernetwork, HypernetworkSettings

FAMILY_WIDTHS = {"sd1": [320, 640, 768, 1280], "sd2": [320, 640, 1024, 1280], "sdxl": [640, 1280, 2048]}
A1111_FILES = "**/*.pt"
COMFY_ACTIVATIONS = {"linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish"}


def a1111_module_keys(dim: int, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state dict A1111's HypernetworkModule expects for width `dim` and the file's settings."""
    ls = meta.get("layer_structure") or [1, 2, 1]
    act = meta.get("activation_func")
    drops = meta.get("dropout_structure") or [0] * len(ls)
    out: dict[str, tuple[int, ...]] = {}
    i = 0
    for j in range(len(ls) - 1):
        a, b = int(dim * ls[j]), int(dim * ls[j + 1])
        out[f"linear.{i}.weight"], out[f"linear.{i}.bias"] = (b, a), (b,)
        i += 1
        last = j >= len(ls) - 2
        if act not in (None, "linear") and not (last and not meta.get("activate_output", True)):
            i += 1  # the activation module has no weights
        if meta.get("is_layer_norm"):
            out[f"linear.{i}.weight"], out[f"linear.{i}.bias"] = (b,), (b,)
            i += 1
        if drops[j + 1] > 0:
            i += 1
    return out


def comfy_layers(module: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[str]:
    """The layers ComfyUI builds from one module dict, or raises ValueError where it would fail."""
    if meta.get("activation_func", "linear") not in COMFY_ACTIVATIONS:
        raise ValueError("Unsupported Hypernetwork format")
    names = [k[: -len(".weight")] for k in module if k.endswith(".weight")]
    layers, i = [], 0
    while i < len(names):
        w = module[names[i] + ".weight"]
        if w.ndim != 2 or names[i] + ".bias" not in module:
            raise ValueError(f"{names[i]} is not a Linear")
        layers.append(f"Linear{tuple(w.shape)}")
        if meta.get("is_layer_norm"):
            i += 1
            if module[names[i] + ".weight"].ndim != 1:
                raise ValueError(f"{names[i]} is not a LayerNorm")
            layers.append("LayerNorm")
        i += 1
    return layers


SETTINGS = {
    "default": HypernetworkSettings(),
    "relu+ln": HypernetworkSettings(activation_func="relu", is_layer_norm=True),
    "deep+dropout": HypernetworkSettings(layer_structure=[1, 2, 2, 1], activation_func="leakyrelu",
                                         use_dropout=True, last_layer_dropout=True),
    "activate_output": HypernetworkSettings(activation_func="tanh", activate_output=True, is_layer_norm=True),
}


def _write(tmp_path: Path, family: str, settings: HypernetworkSettings) -> Path:
    torch.manual_seed(0)
    hn = Hypernetwork(FAMILY_WIDTHS[family], settings, name="sketch")
    return save_hypernetwork(hn, tmp_path / "sketch.pt")  # the default format of `train hypernetwork`


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("family", list(FAMILY_WIDTHS))
def test_a1111_and_comfyui_build_the_same_modules_from_our_file(tmp_path, family, setting):
    from test_interop_a1111_pickles import a1111_accepts

    path = _write(tmp_path, family, SETTINGS[setting])
    assert sorted(p.name for p in tmp_path.glob(A1111_FILES)) == ["sketch.pt"]
    a1111_accepts(path)
    data = torch.load(path, weights_only=True)  # ComfyUI's load
    widths = [k for k in data if type(k) is int]  # A1111 takes int keys only
    assert widths == FAMILY_WIDTHS[family]
    meta = {k: v for k, v in data.items() if isinstance(k, str)}
    for w in widths:
        assert isinstance(data[w], (tuple, list)) and len(data[w]) == 2
        for module in data[w]:
            assert {k: tuple(v.shape) for k, v in module.items()} == a1111_module_keys(w, meta)
            linears = [s for s in comfy_layers(module, meta) if s.startswith("Linear")]
            ls = meta["layer_structure"]
            assert linears == [f"Linear({int(w * ls[j + 1])}, {int(w * ls[j])})" for j in range(len(ls) - 1)]


def test_comfyui_refuses_what_sdtune_warns_about(tmp_path):
    """gelu is not among ComfyUI's activations; the trainer says so before training."""
    from sdtune.training.methods.hypernetwork import HypernetworkOptions, comfyui_warnings

    path = _write(tmp_path, "sd1", HypernetworkSettings(activation_func="gelu"))
    data = torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match="Unsupported"):
        comfy_layers(data[768][0], {k: v for k, v in data.items() if isinstance(k, str)})
    assert any("gelu" in w for w in comfyui_warnings(HypernetworkOptions(activation="gelu")))


def test_safetensors_hypernetworks_are_not_what_either_tool_lists(tmp_path):
    """The optional .safetensors form: A1111 lists *.pt only; ComfyUI lists it but finds no int keys (nothing
    applied). The docs say so; the check: its keys are strings, not the widths both tools look for."""
    from safetensors.torch import load_file

    hn = Hypernetwork(FAMILY_WIDTHS["sd1"], name="x")
    path = save_hypernetwork(hn, tmp_path / "x.safetensors")
    assert not list(tmp_path.glob(A1111_FILES))
    keys = load_file(str(path))
    assert all(re.match(r"^\d+\.[kv]\.linear\.\d+\.(weight|bias)$", k) for k in keys)
    assert not any(type(k) is int for k in keys)


def test_the_rule_numbers_modules_as_a1111_does():
    """The Sequential indices A1111 loads strictly: relu + layer norm, 1-2-1; the output activation (on when a file
    does not say) shifts the last LayerNorm."""
    meta = {"layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": True, "activate_output": False}
    idx = sorted({int(k.split(".")[1]) for k in a1111_module_keys(8, meta)})
    assert idx == [0, 2, 3, 4]
    del meta["activate_output"]
    assert sorted({int(k.split(".")[1]) for k in a1111_module_keys(8, meta)}) == [0, 2, 3, 5]
