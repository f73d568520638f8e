"""diffusers/PEFT LoRA files: what `pipe.save_lora_weights` writes and `pipe.load_lora_weights` reads.

Keys: `unet.<module path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.text_model.<path>...`,
`text_encoder_2...`. lora_A is kohya's lora_down, lora_B its lora_up.

Alpha: diffusers rejects keys without "lora" in them, so `.alpha` tensors cannot be stored. diffusers (>= 0.34) keeps
alpha in the safetensors metadata entry `lora_adapter_metadata`: a JSON object of LoraConfig arguments per component
(`"unet.r"`, `"unet.lora_alpha"`, `"unet.alpha_pattern"`, ...), which `load_lora_weights` turns into the adapter's
LoraConfig. sdtune writes exactly that, so a LoRA with alpha != rank loads in diffusers with its trained scale. Tools
that ignore this metadata (and files written without it) use alpha = rank (scale 1); prefer the kohya format for
A1111/ComfyUI.

Read as well: older diffusers layouts (`.lora.down.weight`, `.lora_linear_layer.down.weight`, attention-processor
names `attn1.processor.to_q_lora.down.weight`), `.alpha` keys that some converters add, and PEFT's own
`base_model.model.<path>.lora_A.weight` (UNet or text encoder told apart by the module names).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from sdtune.adapters.lora import keys as K
from sdtune.adapters.lora.lycoris import refuse_unsupported
from sdtune.adapters.lora.network import LoraModule, LoraNetwork, check_network, detect_family, layout_from_metadata
from sdtune.errors import SdtuneError

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

_PAIR = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
_PROC = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TE_PROC = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def is_diffusers(keys: Any) -> bool:
    return any(re.search(r"\.lora_[AB]\.weight$|\.lora\.(down|up)\.weight$|lora_linear_layer\.(down|up)\.weight$|"
                         r"_lora\.(down|up)\.weight$", str(k)) for k in keys)


def _split(key: str) -> tuple[str, str] | None:
    """(module prefix, 'down'|'up'|'alpha') of a diffusers/PEFT key, None for other keys."""
    for down, up in _PAIR:
        if key.endswith(down):
            return key[: -len(down)], "down"
        if key.endswith(up):
            return key[: -len(up)], "up"
    if m := re.match(r"(.*)\.processor\.(to_[qkv]_lora|to_out_lora)\.(down|up)\.weight$", key):
        return f"{m[1]}.{_PROC[m[2]]}", m[3]
    if m := re.match(r"(.*)\.(to_[qkv]_lora|to_out_lora)\.(down|up)\.weight$", key):  # old text-encoder layout
        return f"{m[1]}.{_TE_PROC[m[2]]}", m[3]
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return None


def _canonical(prefix: str) -> str | None:
    """Canonical module name for a key prefix (`unet.x`, `text_encoder.x`, or a bare PEFT path)."""
    if prefix.startswith("base_model.model."):
        prefix = prefix[len("base_model.model."):]
    comp, _, path = prefix.partition(".")
    if comp not in K.COMPONENTS:  # a bare path: tell UNet from CLIP by the module grammar
        for comp_guess, candidate in (("unet", prefix), ("text_encoder", prefix)):
            name = f"{comp_guess}.{K.canonical_path(comp_guess, None, candidate)}"
            if K.is_lora_module(name):
                return name
        return None
    if comp != "unet":
        path = K.canonical_path(comp, None, path)
    name = f"{comp}.{path}"
    return name if K.is_lora_module(name) else None


def _pattern_value(patterns: Mapping[str, Any], path: str) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path ending in it (regex)."""
    candidates = [path]
    if path.startswith("text_model."):
        candidates.append(path[len("text_model."):])
    for key, value in patterns.items():
        for cand in candidates:
            try:
                if re.match(rf"(.*\.)?({key})$", cand):
                    return value
            except re.error:
                if cand == key or cand.endswith("." + key):
                    return value
    return None


def adapter_metadata(meta: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' `lora_adapter_metadata` split per component: {component: LoraConfig kwargs}."""
    raw = meta.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    if isinstance(flat, dict):
        for k, v in flat.items():
            comp, _, arg = str(k).partition(".")
            if comp in K.COMPONENTS and arg:
                out.setdefault(comp, {})[arg] = v
    return out


def _alpha_from_config(cfg: Mapping[str, Any], path: str, rank: int) -> float | None:
    """kohya-style alpha (scale * rank) from LoraConfig kwargs, or None when the config says nothing."""
    if not cfg:
        return None
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path)
    if alpha is None:
        alpha = cfg.get("lora_alpha")
    if alpha is None:
        return None
    alpha = float(alpha)
    if cfg.get("use_rslora"):
        return alpha / math.sqrt(rank) * rank
    return alpha


def diffusers_to_network(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], *, source: str = "",
                         peft_config: Mapping[str, Any] | None = None) -> LoraNetwork:
    """Parse a diffusers/PEFT state dict. peft_config: LoraConfig kwargs of a bare PEFT file (adapter_config.json)."""
    refuse_unsupported(sd.keys(), source or "this LoRA")
    configs = adapter_metadata(meta)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    keys_of: dict[str, list[str]] = {}
    for key, t in sd.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        prefix, part = split
        groups.setdefault(prefix, {})[part] = t
        keys_of.setdefault(prefix, []).append(key)
    modules: dict[str, LoraModule] = {}
    for prefix, parts in groups.items():
        name = _canonical(prefix)
        if name is None or "down" not in parts or "up" not in parts:
            unknown.extend(keys_of[prefix])
            continue
        if name in modules:
            raise SdtuneError(f"{source}: module {name} appears twice; the file is inconsistent, re-export it")
        comp, _, path = name.partition(".")
        down, up = parts["down"], parts["up"]
        rank = int(down.shape[0])
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().item())
        else:
            cfg = configs.get(comp) or (peft_config if not prefix.startswith(K.COMPONENTS) else None) or {}
            configured = _alpha_from_config(cfg, path, rank)
            # without one, diffusers' convention without metadata: scale 1
            alpha = configured if configured is not None else float(rank)
        modules[name] = LoraModule(down=down, up=up, alpha=alpha)
    net = LoraNetwork(modules=modules, metadata=dict(meta), unet_layout=layout_from_metadata(meta), source=source,
                      unknown_keys=sorted(unknown))
    net.family = detect_family(modules, meta)
    if modules:
        check_network(net)
    return net


def _config_kwargs(items: list[tuple[str, LoraModule]], *, strip_text_model: bool) -> dict[str, Any]:
    """LoraConfig kwargs (r, lora_alpha, rank/alpha patterns, target modules) for one component."""
    def key(path: str) -> str:
        if strip_text_model and path.startswith("text_model."):
            path = path[len("text_model."):]
        return re.escape(path)

    ranks = Counter(m.rank for _, m in items)
    alphas = Counter(float(m.alpha) for _, m in items)
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    targets = sorted({p[len("text_model."):] if strip_text_model and p.startswith("text_model.") else p
                      for p, _ in items})
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {key(p): m.rank for p, m in items if m.rank != r},
        "alpha_pattern": {key(p): float(m.alpha) for p, m in items if float(m.alpha) != alpha},
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def network_to_diffusers(net: LoraNetwork, *, dtype: torch.dtype | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(state dict in the diffusers/PEFT layout, {component: LoraConfig kwargs}) of a network."""
    sd: dict[str, torch.Tensor] = {}
    per_comp: dict[str, list[tuple[str, LoraModule]]] = {}
    for name, m in sorted(net.modules.items()):
        comp, _, path = name.partition(".")
        down, up = m.down.detach(), m.up.detach()
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        sd[f"{name}.lora_A.weight"] = down.contiguous()
        sd[f"{name}.lora_B.weight"] = up.contiguous()
        per_comp.setdefault(comp, []).append((path, m))
    configs = {comp: _config_kwargs(items, strip_text_model=comp != "unet") for comp, items in per_comp.items()}
    return sd, configs


def flat_adapter_metadata(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{component: kwargs} -> diffusers' flat {"unet.r": ..., "text_encoder.lora_alpha": ...}."""
    return {f"{comp}.{k}": v for comp, kw in configs.items() for k, v in kw.items()}


def save_diffusers(net: LoraNetwork, path: str | Path, *, dtype: torch.dtype | None = None,
                   comment: str | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `net` in the diffusers/PEFT layout with alpha in `lora_adapter_metadata` (atomic)."""
    from sdtune.version import __version__
    from sdtune.formats.safe_io import save_safetensors_atomic

    out = Path(path)
    if out.suffix.lower() != ".safetensors":
        raise SdtuneError(f"{out.name}: LoRA files are written as .safetensors")
    check_network(net, max_rank=True)
    sd, configs = network_to_diffusers(net, dtype=dtype)
    meta: dict[str, str] = {"format": "pt",
                            ADAPTER_METADATA_KEY: json.dumps(flat_adapter_metadata(configs), indent=2, sort_keys=True),
                            "sdtune_version": __version__, "sdtune_format": "diffusers",
                            "sdtune_modules": str(len(net.modules))}
    if net.family:
        meta["sdtune_family"] = net.family
        from sdtune.models.family import KOHYA_BASE_MODEL_VERSION

        if net.family in KOHYA_BASE_MODEL_VERSION:  # what LoRA browsers (and `sdtune info`) read for the family
            meta["ss_base_model_version"] = KOHYA_BASE_MODEL_VERSION[net.family]
    if net.unet_layout and "unet" in configs:
        meta["sdtune_unet_layout"] = json.dumps(K.unet_layout(net.unet_layout))
    if comment:
        meta["sdtune_comment"] = comment
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return save_safetensors_atomic(sd, out, meta)
