"""kohya LoRA files (what kohya sd-scripts writes and A1111, Forge, ComfyUI, InvokeAI and diffusers read).

Per module `<kohya name>.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha` (scale = alpha / rank; a
missing alpha means alpha = rank). Conv modules (1x1 projections of SD1, 3x3 resnet convs of LoCon) keep their
kernels: lora_down [r, in, kh, kw], lora_up [out, r, 1, 1]. Key names: see `keys.py`. LyCORIS LoHa/LoKr files use
the same module names with `hada_*` / `lokr_*` tensors (no `.weight` suffix); they are read through
`loha_lokr.py` and kept as they are (`LoraNetwork.lycoris`).

Metadata written: the `ss_*` keys kohya tools and LoRA browsers read (ss_network_module "networks.lora",
ss_network_dim, ss_network_alpha, ss_network_args for conv layers, ss_base_model_version "sd_v1"/"sd_v2"/
"sdxl_base_v1-0", ss_v2, ss_training_comment, ...), `modelspec.*` (architecture ".../lora") and sdtune's own
`sdtune_*` keys (family, UNet layout for SGM names, version).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from sdtune.adapters.lora import keys as K
from sdtune.adapters.lora.loha_lokr import PARTS as LYCORIS_PARTS
from sdtune.adapters.lora.loha_lokr import LycorisModule, algorithm_of, lycoris_module
from sdtune.adapters.lora.lycoris import fold_tucker, is_locon, refuse_unsupported
from sdtune.adapters.lora.network import (
    LoraModule,
    LoraNetwork,
    check_alpha,
    check_finite,
    check_network,
    detect_family,
    layout_from_metadata,
)
from sdtune.errors import SdtuneError
from sdtune.models.family import KOHYA_BASE_MODEL_VERSION

log = logging.getLogger(__name__)

_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid",
             **{p: p for p in LYCORIS_PARTS}}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                   "sdxl": "stable-diffusion-xl-v1-base",
                   "sdxl-refiner": "stable-diffusion-xl-v1-refiner"}


def is_kohya(keys: Any) -> bool:
    return any(str(k).startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_to_network(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], *, source: str = "",
                     layout: Mapping[str, Any] | None = None) -> LoraNetwork:
    """Parse a kohya state dict. Keys that are not LoRA modules end up in `network.unknown_keys`."""
    refuse_unsupported(sd.keys(), source or "this LoRA")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        mod, _, suffix = key.partition(".")
        if suffix in _SUFFIXES:
            groups.setdefault(mod, {})[_SUFFIXES[suffix]] = t
        else:
            unknown.append(key)
    sgm = K.uses_sgm_names(groups)
    # which family's shipped UNet layout maps SGM names when neither the file nor the caller gives one
    meta_family = "sdxl" if any(k.startswith("lora_te2_") for k in groups) else detect_family({}, meta, sgm)
    layout = layout_from_metadata(meta) or (dict(layout) if layout is not None else None)  # the file's own first
    try:
        padding = set(json.loads(meta.get("sdtune_zero_modules", "[]")))
    except ValueError:
        padding = set()
    modules: dict[str, LoraModule] = {}
    lycoris: dict[str, LycorisModule] = {}
    origin: dict[str, str] = {}
    for mod, parts in groups.items():
        name = K.from_kohya(mod, layout, meta_family)
        algo = algorithm_of(parts)
        if name is None or (algo is None and ("down" not in parts or "up" not in parts)):
            unknown.extend(f"{mod}.{s}" for s, p in _SUFFIXES.items() if p in parts)
            continue
        if algo is None and name in padding and not bool(parts["up"].any()) and not bool(parts["down"].any()):
            continue  # sdtune's zero compatibility module (see diffusers_padding)
        if name in modules or name in lycoris:
            raise SdtuneError(f"{source}: {mod} and {origin[name]} are the same module ({name}); the file is "
                              "inconsistent, re-export it")
        alpha_t = parts.get("alpha")
        if alpha_t is not None and alpha_t.numel() != 1:
            raise SdtuneError(f"{source}: {mod}.alpha has shape {list(alpha_t.shape)}; alpha must be one number")
        if algo is not None:
            for part, t in parts.items():  # checked before the rewrite so the message names the file's key
                check_finite(f"{mod}.{part}", t, source)
            file_alpha = float(alpha_t.float().item()) if alpha_t is not None else None
            if file_alpha is not None:
                check_alpha(mod, file_alpha, source)
            lycoris[name] = lycoris_module(parts, file_alpha, f"{source}: {mod}")
            origin[name] = mod
            continue
        down, up = parts["down"], parts["up"]
        if "mid" in parts:
            down = fold_tucker(down, parts["mid"], mod, source)
        alpha = float(alpha_t.float().item()) if alpha_t is not None else float(down.shape[0])
        modules[name] = LoraModule(down=down, up=up, alpha=alpha)
        origin[name] = mod
    net = LoraNetwork(modules=modules, metadata=dict(meta), unet_layout=layout, source=source,
                      unknown_keys=sorted(unknown), lycoris=lycoris)
    net.family = detect_family({**modules, **lycoris}, meta, sgm_names=sgm)
    if modules or lycoris:
        check_network(net)
    return net


def network_to_kohya(net: LoraNetwork, *, family: str | None = None, layout: Mapping[str, Any] | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya state dict of a network (alpha as float32 scalars, weights in `dtype` or as they are)."""
    family = family or net.family
    layout = layout or net.unet_layout
    out: dict[str, torch.Tensor] = {}
    for name, m in sorted(net.modules.items()):
        try:
            kname = K.to_kohya(name, family, layout)
        except ValueError as exc:
            raise SdtuneError(f"{name} cannot be written in the kohya format ({exc})") from None
        down, up = m.down.detach(), m.up.detach()
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        out[f"{kname}.lora_down.weight"] = down.contiguous()
        out[f"{kname}.lora_up.weight"] = up.contiguous()
        out[f"{kname}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def kohya_metadata(net: LoraNetwork, *, family: str | None = None, layout: Mapping[str, Any] | None = None,
                   comment: str | None = None, title: str | None = None) -> dict[str, str]:
    """ss_* (kohya), modelspec.* and sdtune_* metadata for a network."""
    from sdtune.version import __version__

    family = family or net.family
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    conv_ranks: Counter[int] = Counter()
    conv_alphas: Counter[float] = Counter()
    for m in net.modules.values():
        big_kernel = m.is_conv and tuple(m.down.shape[2:]) != (1, 1)
        (conv_ranks if big_kernel else ranks)[m.rank] += 1
        (conv_alphas if big_kernel else alphas)[float(m.alpha)] += 1
    dim = (ranks or conv_ranks).most_common(1)[0][0]
    alpha = (alphas or conv_alphas).most_common(1)[0][0]
    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _fmt(alpha),
        "ss_v2": str(family == "sd2"),
        "ss_output_name": title or "",
        "ss_training_comment": comment or "",
        "sdtune_version": __version__,
        "sdtune_format": "kohya",
        "sdtune_modules": str(len(net.modules)),
    }
    meta["ss_network_args"] = json.dumps(
        {"conv_dim": str(conv_ranks.most_common(1)[0][0]), "conv_alpha": _fmt(conv_alphas.most_common(1)[0][0])}
        if conv_ranks else {})
    if family in KOHYA_BASE_MODEL_VERSION:
        meta["ss_base_model_version"] = KOHYA_BASE_MODEL_VERSION[family]
    if family:
        meta["sdtune_family"] = family
    if family in _MODELSPEC_ARCH:
        meta.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{_MODELSPEC_ARCH[family]}/lora",
                     "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
                     if family.startswith("sdxl") else "diffusers",
                     "modelspec.title": title or ""})
    lay = layout or net.unet_layout
    if lay and any(n.startswith("unet.") for n in net.modules):
        meta["sdtune_unet_layout"] = json.dumps(K.unet_layout(lay))
    return {k: v for k, v in meta.items() if v != "" or k in ("ss_training_comment",)}


def diffusers_padding(net: LoraNetwork) -> dict[str, LoraModule]:
    """Zero LoRA modules that make a kohya file load in diffusers.

    diffusers (0.42) tells the layout of a kohya text-encoder LoRA from its key names and only recognises it when
    some `out_proj` or MLP module is present; a text-encoder LoRA of only q/k/v projections (a common PEFT choice)
    fails there with "Could not automatically infer state dict type". kohya's own files always include out_proj.
    For such a text encoder, a rank-1 LoRA with zero factors is added on layer 0's out_proj: it changes nothing in
    any tool (its delta is exactly 0) and makes diffusers read the file."""
    pads: dict[str, LoraModule] = {}
    for comp in ("text_encoder", "text_encoder_2"):
        mods = {n: m for n, m in net.modules.items() if n.startswith(comp + ".")}
        if not mods or any(n.endswith((".out_proj", ".fc1", ".fc2")) for n in mods):
            continue
        width = next((int(m.down.shape[1]) for n, m in mods.items() if n.endswith(("q_proj", "k_proj", "v_proj"))),
                     None)
        if width is None:
            continue
        dtype = next(iter(mods.values())).down.dtype
        name = f"{comp}.text_model.encoder.layers.0.self_attn.out_proj"
        # the component's usual alpha: diffusers maps per-module alphas of text-encoder attention wrongly
        alpha = Counter(float(m.alpha) for m in mods.values()).most_common(1)[0][0]
        pads[name] = LoraModule(down=torch.zeros(1, width, dtype=dtype), up=torch.zeros(width, 1, dtype=dtype),
                                alpha=alpha)
    return pads


def shared_text_alphas(net: LoraNetwork) -> tuple[LoraNetwork, list[str]]:
    """One alpha per text encoder, with lora_up rescaled so every delta stays the same.

    diffusers (0.42) maps per-module alphas of kohya text-encoder attention layers to the wrong module names, so
    those layers load with the component's most common alpha instead (the self-check catches this). Folding the
    difference into lora_up (up * alpha / common) keeps each module's delta and gives the file one alpha per text
    encoder, which every tool reads the same way. Returns (network, names of the rescaled modules)."""
    changed: list[str] = []
    modules = dict(net.modules)
    for comp in ("text_encoder", "text_encoder_2"):
        mods = {n: m for n, m in modules.items() if n.startswith(comp + ".")}
        alphas = Counter(float(m.alpha) for m in mods.values())
        if len(alphas) < 2:
            continue
        common = alphas.most_common(1)[0][0]
        for n, m in mods.items():
            if float(m.alpha) != common:
                up = (m.up.to(torch.promote_types(m.up.dtype, torch.float32)) * (float(m.alpha) / common))
                modules[n] = LoraModule(down=m.down, up=up.to(m.up.dtype), alpha=common)
                changed.append(n)
    if not changed:
        return net, []
    return LoraNetwork(modules, net.family, net.metadata, net.unet_layout, net.source), sorted(changed)


def save_kohya(net: LoraNetwork, path: str | Path, *, family: str | None = None,
               layout: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None, comment: str | None = None,
               metadata: Mapping[str, str] | None = None, pad_for_diffusers: bool = True) -> Path:
    """Write `net` as a kohya .safetensors LoRA (atomic). Refuses ranks larger than a layer, alpha 0, NaN/inf.

    pad_for_diffusers: add the zero modules of `diffusers_padding` where diffusers needs them (listed in the
    metadata as `sdtune_zero_modules`) and give each text encoder one alpha (`shared_text_alphas`; rescaled
    modules are listed as `sdtune_rescaled_alpha`). Deltas are unchanged either way."""
    from sdtune.formats.safe_io import save_safetensors_atomic

    out = Path(path)
    if out.suffix.lower() != ".safetensors":
        raise SdtuneError(f"{out.name}: LoRA files are written as .safetensors")
    check_network(net, max_rank=True)
    bundled = net.embeddings
    family = family or net.family
    if family is None and any(n.startswith("text_encoder_2.") for n in net.modules):
        family = "sdxl"
    rescaled: list[str] = []
    if pad_for_diffusers:
        net, rescaled = shared_text_alphas(net)
    pads = diffusers_padding(net) if pad_for_diffusers else {}
    written = LoraNetwork({**net.modules, **pads}, net.family, net.metadata, net.unet_layout, net.source) \
        if pads else net
    tensors = network_to_kohya(written, family=family, layout=layout, dtype=dtype)
    from sdtune.adapters.lora.bundled import bundle_keys

    tensors.update(bundle_keys(bundled))  # bundled embeddings, as A1111 reads them
    meta = kohya_metadata(net, family=family, layout=layout, comment=comment, title=out.stem)
    if pads:
        meta["sdtune_zero_modules"] = json.dumps(sorted(pads))
    if rescaled:
        meta["sdtune_rescaled_alpha"] = json.dumps(rescaled)
    if is_locon([m.down.shape for m in net.modules.values()]):
        meta["sdtune_conv_layers"] = "true"
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return save_safetensors_atomic(tensors, out, meta)
