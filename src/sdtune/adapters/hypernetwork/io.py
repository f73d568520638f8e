"""Hypernetwork files: A1111's .pt layout and sdtune's safetensors form (the default for new files).

A1111 .pt (a pickle, read only with `torch.load(weights_only=True)`): a dict whose integer keys are context widths,
each mapping to (state_dict of the to_k module, state_dict of the to_v module) with `linear.<n>.weight/bias` keys,
next to the metadata keys name, step, layer_structure, activation_func, is_layer_norm, weight_initialization,
activate_output, use_dropout, dropout_structure, last_layer_dropout, sd_checkpoint, sd_checkpoint_name (older files
lack some; the oldest use `linear1`/`linear2` keys, mapped to `linear.0`/`linear.1`).

safetensors: the same tensors flattened as `<width>.<k|v>.linear.<n>.<weight|bias>`, the same metadata as JSON in
the `sdtune_hypernetwork` metadata key (plus `sdtune_format = hypernetwork` and any training metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from sdtune.adapters.hypernetwork.network import Hypernetwork, HypernetworkSettings, parse_floats
from sdtune.errors import SdtuneError

META_KEY = "sdtune_hypernetwork"
FORMAT_KEY = "sdtune_format"
FORMATS = ("safetensors", "a1111")
_LEGACY = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias", "linear2.weight": "linear.1.weight",
           "linear2.bias": "linear.1.bias"}


def file_metadata(hn: Hypernetwork) -> dict[str, Any]:
    """A1111's metadata keys of `hn` (plain Python values)."""
    s = hn.settings
    return {"name": hn.name, "step": int(hn.step), "layer_structure": [float(x) for x in s.layer_structure],
            "activation_func": s.activation_func, "is_layer_norm": bool(s.is_layer_norm),
            "weight_initialization": s.weight_initialization, "activate_output": bool(s.activate_output),
            "use_dropout": bool(s.use_dropout or any(p > 0 for p in s.dropouts())),
            "dropout_structure": [float(p) for p in s.dropouts()], "last_layer_dropout": bool(s.last_layer_dropout),
            "sd_checkpoint": hn.sd_checkpoint, "sd_checkpoint_name": hn.sd_checkpoint_name}


def _settings_from(meta: Mapping[str, Any], source: str) -> HypernetworkSettings:
    layers = meta.get("layer_structure")
    layers = parse_floats(layers, f"{source}: layer_structure") if layers is not None else [1.0, 2.0, 1.0]
    ds = meta.get("dropout_structure")
    ds = parse_floats(ds, f"{source}: dropout_structure") if ds is not None else None
    use = bool(meta.get("use_dropout", False)) or bool(ds and any(ds))
    act = meta.get("activation_func") or "linear"
    init = meta.get("weight_initialization") or "Normal"
    try:
        return HypernetworkSettings(layer_structure=layers, activation_func=str(act),
                                    is_layer_norm=bool(meta.get("is_layer_norm", False)),
                                    weight_initialization=str(init),
                                    activate_output=bool(meta.get("activate_output", False)), use_dropout=use,
                                    dropout_structure=ds, last_layer_dropout=bool(meta.get("last_layer_dropout",
                                                                                           False))).check()
    except SdtuneError as exc:
        raise SdtuneError(f"{source}: {exc}") from None


def _check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise SdtuneError(f"{source}: {len(bad)} tensor(s) hold NaN/Inf (e.g. {bad[0]}); the file is broken")


def from_a1111(obj: Any, source: str = "the file") -> Hypernetwork:
    """A Hypernetwork from the dict an A1111 .pt file holds."""
    if not isinstance(obj, Mapping):
        raise SdtuneError(f"{source} holds a {type(obj).__name__}, not an A1111 hypernetwork")
    widths = [k for k in obj if isinstance(k, int)]
    if not widths:
        raise SdtuneError(f"{source} has no integer layer-width keys; it is not an A1111 hypernetwork")
    settings = _settings_from(obj, source)
    flat: dict[str, torch.Tensor] = {}
    for w in widths:
        pair = obj[w]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(p, Mapping) for p in pair):
            raise SdtuneError(f"{source}: width {w} does not hold a (to_k, to_v) pair of state dicts")
        for kv, sd in zip("kv", pair):
            for key, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise SdtuneError(f"{source}: {w}.{kv}.{key} is not a tensor")
                flat[f"{w}.{kv}.{_LEGACY.get(str(key), str(key))}"] = t.detach().float()
    _check_finite(flat, source)
    hn = Hypernetwork(widths, settings, name=str(obj.get("name") or ""), step=int(obj.get("step") or 0),
                      sd_checkpoint=_opt_str(obj.get("sd_checkpoint")),
                      sd_checkpoint_name=_opt_str(obj.get("sd_checkpoint_name")))
    hn.load_flat_state_dict(flat, source)
    return hn


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def to_a1111(hn: Hypernetwork) -> dict[Any, Any]:
    """The dict of an A1111 .pt file (plain containers, CPU tensors: loadable with weights_only=True)."""
    out: dict[Any, Any] = {}
    for w, pair in hn.module_pairs():
        out[int(w)] = tuple({k: v.detach().to("cpu", torch.float32).contiguous().clone()
                             for k, v in m.state_dict().items()} for m in pair)
    out.update(file_metadata(hn))
    out["optional_info"] = None
    return out


def read_hypernetwork(path: str | Path) -> Hypernetwork:
    """Read an A1111 .pt (weights_only) or sdtune .safetensors hypernetwork onto the CPU, fp32."""
    from sdtune.formats.safe_io import SAFETENSORS_EXTS, check_file, load_pickle, read_safetensors_metadata, \
        read_state_dict

    p = check_file(path)
    source = p.name
    if p.suffix.lower() in SAFETENSORS_EXTS:
        meta = read_safetensors_metadata(p)
        if META_KEY not in meta:
            raise SdtuneError(f"{source} is not a hypernetwork (no {META_KEY} metadata); run `sdtune info {p}`")
        try:
            info = json.loads(meta[META_KEY])
        except ValueError:
            raise SdtuneError(f"{source}: its {META_KEY} metadata is not valid JSON") from None
        state = {k: v.float() for k, v in read_state_dict(p).items()}
        widths = sorted({int(k.split(".", 1)[0]) for k in state if k.split(".", 1)[0].isdigit()})
        if not widths or any(not k.split(".", 1)[0].isdigit() for k in state):
            raise SdtuneError(f"{source}: tensor names are not <width>.<k|v>.linear.<n>.<weight|bias>")
        _check_finite(state, source)
        hn = Hypernetwork(widths, _settings_from(info, source), name=str(info.get("name") or p.stem),
                          step=int(info.get("step") or 0), sd_checkpoint=_opt_str(info.get("sd_checkpoint")),
                          sd_checkpoint_name=_opt_str(info.get("sd_checkpoint_name")))
        hn.load_flat_state_dict(state, source)
        hn.extra_metadata = {k: v for k, v in meta.items() if k not in (META_KEY, FORMAT_KEY)}
        return hn
    hn = from_a1111(load_pickle(p), source)
    if not hn.name:
        hn.name = p.stem
    return hn


def save_hypernetwork(hn: Hypernetwork, path: str | Path, *, format: str | None = None,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write `hn` atomically. format: safetensors or a1111 (.pt); default from the extension (.pt/.ckpt ->
    a1111). `metadata` (strings) goes into the safetensors header; A1111 files keep only A1111's keys."""
    p = Path(path)
    fmt = format or ("a1111" if p.suffix.lower() in (".pt", ".ckpt", ".pth") else "safetensors")
    if fmt not in FORMATS:
        raise SdtuneError(f"hypernetwork format {fmt!r} is unknown; use {' or '.join(FORMATS)}")
    if fmt == "safetensors":
        from sdtune.formats.safe_io import save_safetensors_atomic

        meta = {**{str(k): str(v) for k, v in (metadata or {}).items()}, FORMAT_KEY: "hypernetwork",
                META_KEY: json.dumps(file_metadata(hn))}
        return save_safetensors_atomic(hn.flat_state_dict(), p, meta)
    from sdtune.formats.safe_io import save_torch_pickle_atomic

    return save_torch_pickle_atomic(to_a1111(hn), p)  # the legacy pickle layout A1111's safe unpickler accepts


def convert_hypernetwork(info: Any, target: str, out: Path, *, dtype: str | None = None, **_: Any) -> str:
    """`sdtune convert` for hypernetworks: A1111 .pt <-> safetensors. The result is read back and must hold the
    same settings and bit-identical tensors."""
    if dtype not in (None, "fp32"):
        raise SdtuneError("hypernetworks are converted in fp32 (A1111 loads them so); drop --dtype")
    want_ext = ".pt" if target == "a1111" else ".safetensors"
    if Path(out).suffix.lower() != want_ext:
        raise SdtuneError(f"--to {target} writes a {want_ext} file; name the output *{want_ext}")
    hn = read_hypernetwork(info.path)
    path = save_hypernetwork(hn, out, format=target)
    back = read_hypernetwork(path)
    a, b = hn.flat_state_dict(), back.flat_state_dict()
    if set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in a) or file_metadata(hn) != file_metadata(back):
        raise SdtuneError(f"sdtune bug: {path.name} does not read back as {info.path.name}")
    return f"{info.path.name} ({hn.describe()}) -> {path} ({target}; read back: identical)"
