"""`identify(path)`: say what any SD-related file is (checkpoint, VAE, embedding, LoRA, hypernetwork, diffusers
folder ...) and for which model family, from key names and shapes only; nothing is instantiated."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.formats.safe_io import (
    PICKLE_EXTS,
    SAFETENSORS_EXTS,
    WEIGHT_EXTS,
    check_file,
    load_pickle,
    read_safetensors_header,
    unwrap_state_dict,
)

KINDS = ("checkpoint", "vae", "embedding", "lora", "hypernetwork", "diffusers", "unet", "text_encoder",
         "controlnet", "unknown")
# Text/cross-attention widths that identify a family: CLIP-L (SD1), OpenCLIP-H (SD2), CLIP-L+bigG (SDXL).
_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 1280: "sdxl", 2048: "sdxl"}
_HN_SIZES = (320, 640, 768, 1024, 1280)


@dataclass
class FileInfo:
    """What a file is. `summary` holds human-readable lines about its contents (shapes, ranks, tokens ...)."""

    path: Path
    kind: str
    family: str | None
    format: str  # "safetensors" | "pickle" | "diffusers-folder"
    tensor_count: int
    parameters: int
    dtypes: dict[str, int] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fmt_params(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _prefix_summary(shapes: Mapping[str, tuple[int, ...]], depth: int) -> list[str]:
    groups: dict[str, list[tuple[int, ...]]] = {}
    for k, s in shapes.items():
        groups.setdefault(".".join(k.split(".")[:depth]), []).append(s)
    return [f"{g}: {len(v)} tensors, {_fmt_params(sum(map(_numel, v)))} params" for g, v in sorted(groups.items())]


def _checkpoint_groups(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Tensor counts per model part of an original-layout checkpoint (UNet, VAE, each text encoder, EMA...)."""
    known = ("model.diffusion_model", "first_stage_model", "cond_stage_model", "conditioner.embedders.0",
             "conditioner.embedders.1", "model_ema")
    groups: dict[str, list[tuple[int, ...]]] = {}
    for k, s in shapes.items():
        g = next((p for p in known if k.startswith(p + ".")), k.split(".")[0])
        groups.setdefault(g, []).append(s)
    return [f"{g}: {len(v)} tensors, {_fmt_params(sum(map(_numel, v)))} params" for g, v in groups.items()]


def _small_summary(shapes: Mapping[str, tuple[int, ...]], limit: int = 8) -> list[str]:
    lines = [f"{k}: {list(s)}" for k, s in list(shapes.items())[:limit]]
    if len(shapes) > limit:
        lines.append(f"... {len(shapes) - limit} more")
    return lines


def _width_family(width: int | None) -> str | None:
    return _WIDTH_FAMILY.get(width) if width else None


def _embedding_family(widths: list[int]) -> str | None:
    if 768 in widths and 1280 in widths:
        return "sdxl"
    return _width_family(widths[0]) if len(widths) == 1 and widths[0] != 1280 else None


# ---------------------------------------------------------------- classification of tensor maps


def _classify_lora(shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, str]) -> tuple[str | None, dict, list]:
    bundled: dict[str, int] = {}  # embeddings bundled in the LoRA (A1111's bundle_emb.<name>.*): name -> vectors
    for k, shp in shapes.items():
        if k.startswith("bundle_emb.") and len(k.split(".")) >= 3:
            bundled[k.split(".")[1]] = int(shp[0]) if len(shp) == 2 else 1
    shapes = {k: v for k, v in shapes.items() if not k.startswith("bundle_emb.")}
    keys = list(shapes)
    suffixes: Counter[str] = Counter()
    for k in keys:
        for tag, name in ((".lora_down.", "LoRA"), (".lora_A.", "LoRA (PEFT)"), ("lora.down.", "LoRA (diffusers)"),
                          (".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr"), (".oft_", "OFT"), (".dora_scale", "DoRA"),
                          (".on_input", "(IA)^3"), (".a1.weight", "GLoRA"), (".diff", "full diff")):
            if tag in k:
                suffixes[name] += 1
    network = ", ".join(n for n, _ in suffixes.most_common()) or "LoRA"
    ranks: Counter[int] = Counter()
    for k, s in shapes.items():
        if (k.endswith((".lora_down.weight", ".lora_A.weight", "lora.down.weight", ".hada_w1_b"))
                and len(s) >= 2):
            ranks[s[0]] += 1
    modules = {re.split(r"\.(lora_|hada_|lokr_|oft_|alpha|dora_|on_input|a1\.|a2\.|b1\.|b2\.|diff)", k)[0]
               for k in keys}
    full_modules = 0  # LoKr modules of two full matrices: no rank (A1111/ComfyUI apply them with scale 1)
    for m in modules:  # LoKr's rank: lokr_w2_b's if W2 is factorised, else lokr_w1_b's (what alpha divides by)
        rank_key = next((f"{m}.{p}" for p in ("lokr_w2_b", "lokr_w1_b") if f"{m}.{p}" in shapes), None)
        if rank_key is not None:
            ranks[shapes[rank_key][0]] += 1
        elif f"{m}.lokr_w1" in shapes and f"{m}.lokr_w2" in shapes:
            full_modules += 1
    te2 = any(k.startswith(("lora_te2_", "text_encoder_2.")) or ".text_encoder_2." in k for k in keys)
    targets: Counter[str] = Counter()
    for m in modules:
        if m.startswith(("lora_unet_", "unet.")) or ".unet." in m or "diffusion_model" in m:
            targets["unet"] += 1
        elif m.startswith(("lora_te2_", "text_encoder_2.")):
            targets["text_encoder_2"] += 1
        elif m.startswith(("lora_te", "text_encoder.")):
            targets["text_encoder"] += 1
        else:
            targets["other"] += 1
    from sdtune.models.family import family_from_kohya_version

    family = family_from_kohya_version(meta.get("ss_base_model_version"))
    if family is None and te2:
        family = "sdxl"
    down = ("lora_down.weight", "lora_A.weight", "down.weight", "hada_w1_b")
    if family is None:  # cross-attention key input width = text width: 768 SD1, 1024 SD2, 2048 SDXL
        family = next((f for k, s in shapes.items() if "attn2" in k and "to_k" in k and k.endswith(down)
                       and len(s) >= 2 and (f := _width_family(s[-1]))), None)
    if family is None:  # text-encoder attention input width
        family = next((f for k, s in shapes.items() if k.startswith(("lora_te", "text_encoder.")) and "q_proj" in k
                       and k.endswith(down) and len(s) == 2 and s[1] in (768, 1024) and (f := _width_family(s[1]))),
                      None)
    details: dict[str, Any] = {"network": network, "modules": len(modules), "ranks": dict(ranks),
                               "targets": dict(targets)}
    if "ss_network_alpha" in meta:
        details["alpha"] = meta["ss_network_alpha"]
    rank_txt = ", ".join([f"{r} (x{n})" for r, n in sorted(ranks.items())]
                         + ([f"full (x{full_modules})"] if full_modules else [])) or "n/a"
    if full_modules:
        details["full_modules"] = full_modules
    summary = [f"network: {network}", f"modules: {len(modules)} ({', '.join(f'{t} {n}' for t, n in targets.items())})",
               f"rank: {rank_txt}"]
    if bundled:
        details["bundled_embeddings"] = bundled
        summary.append("bundled embeddings: " + ", ".join(f"{n} ({v} vector(s))" for n, v in sorted(bundled.items())))
    return family, details, summary


def classify_tensors(shapes: Mapping[str, tuple[int, ...]], meta: Mapping[str, str]
                     ) -> tuple[str, str | None, dict[str, Any], list[str]]:
    """(kind, family, details, summary lines) for a flat {key: shape} map."""
    from sdtune.models.family import detect_family

    keys = list(shapes)
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if has("model.diffusion_model.", "conditioner.embedders."):
        try:
            family = detect_family(shapes)
        except SdtuneError:
            family = None
        n_text = sum(has(p) for p in ("cond_stage_model.", "conditioner.embedders.0.", "conditioner.embedders.1."))
        parts = [p for p, pre in (("UNet", ("model.diffusion_model.",)), ("VAE", ("first_stage_model.",)))
                 if has(*pre)] + ([f"text encoder{'s' if n_text > 1 else ''}"] if n_text else [])
        ema = sum(k.startswith("model_ema.") for k in keys)
        summary = [f"components: {', '.join(parts)}"] + (["contains EMA weights (model_ema.*)"] if ema else [])
        ctx = next((s[1] for k, s in shapes.items() if k.startswith("model.diffusion_model.")
                    and k.endswith("attn2.to_k.weight") and len(s) == 2), None)
        if ctx:
            summary.append(f"UNet cross-attention width: {ctx}")
        unet_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
        if unet_in and len(unet_in) == 4 and unet_in[1] != 4:
            summary.append(f"UNet input channels: {unet_in[1]} (inpainting / instruct-pix2pix variant)")
        return "checkpoint", family, {"components": parts}, summary + _checkpoint_groups(shapes)
    if meta.get("sdtune_format") == "hypernetwork":  # sdtune's safetensors form of an A1111 hypernetwork
        sizes = sorted({int(k.split(".", 1)[0]) for k in keys if k.split(".", 1)[0].isdigit()})
        family = "sd2" if 1024 in sizes else ("sd1" if 768 in sizes else ("sdxl" if 2048 in sizes else None))
        family = family or meta.get("sdtune_family")
        return "hypernetwork", family, {"sizes": sizes, "format": "sdtune safetensors"}, [
            f"layer sizes: {', '.join(map(str, sizes))}"] + _small_summary(shapes, 6)
    if has("control_model.", "controlnet_cond_embedding."):
        return "controlnet", None, {}, _prefix_summary(shapes, 1)
    if has("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_") or any(
            re.search(r"\.lora_[AB]\.|\.lora\.(down|up)\.|lora_linear_layer|\.hada_w1_a|\.lokr_w1", k) for k in keys):
        family, details, summary = _classify_lora(shapes, meta)
        return "lora", family, details, summary
    if "emb_params" in shapes or "string_to_param.*" in shapes:
        s = shapes.get("emb_params") or shapes["string_to_param.*"]
        return "embedding", _width_family(s[-1]), {"vectors": s[0] if len(s) == 2 else 1, "width": s[-1],
                                                    "format": "kohya/A1111 safetensors"}, _small_summary(shapes)
    if set(keys) and set(keys) <= {"clip_l", "clip_g"}:
        n = shapes[keys[0]][0] if len(shapes[keys[0]]) == 2 else 1
        return "embedding", "sdxl", {"vectors": n, "format": "SDXL (clip_l/clip_g)"}, _small_summary(shapes)
    stripped = {k.split(".", 1)[1] if k.startswith(("first_stage_model.", "vae.")) else k: s
                for k, s in shapes.items()}
    if any(k.startswith("encoder.") for k in stripped) and any(k.startswith("decoder.") for k in stripped):
        layout = "diffusers" if any(k.startswith("encoder.down_blocks.") for k in stripped) else "original (LDM)"
        latent = stripped.get("decoder.conv_in.weight", (0, 0))[1]
        return "vae", None, {"layout": layout, "latent_channels": latent}, [
            f"layout: {layout}", f"latent channels: {latent}",
            "family: SD1, SD2 and SDXL VAEs share one architecture (SDXL's needs its own weights)"]
    if has("down_blocks.", "conv_in.", "time_embedding.") and any("attn2.to_k" in k for k in keys):
        ctx = next(s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight"))
        fam = {(768, False): "sd1", (1024, False): "sd2", (2048, True): "sdxl", (1280, True): "sdxl-refiner"}.get(
            (ctx, has("add_embedding.")))
        return "unet", fam, {"layout": "diffusers", "cross_attention_dim": ctx}, _prefix_summary(shapes, 1)
    if has("text_model.", "embeddings.token_embedding.") and any("encoder.layers" in k for k in keys):
        tok = shapes.get("text_model.embeddings.token_embedding.weight") or shapes.get(
            "embeddings.token_embedding.weight", (0, 0))
        return "text_encoder", None, {"width": tok[1], "vocab_size": tok[0]}, _prefix_summary(shapes, 2)
    # diffusers textual inversion: {token: [n, d] or [d]} with token-like keys
    if 0 < len(keys) <= 16 and all("." not in k or k.startswith("<") for k in keys) and all(
            1 <= len(s) <= 2 for s in shapes.values()):
        widths = sorted({s[-1] for s in shapes.values()})
        vectors = sum(s[0] if len(s) == 2 else 1 for s in shapes.values())
        return "embedding", _embedding_family(widths), {"tokens": keys, "vectors": vectors, "width": widths[0],
                                                         "format": "diffusers"}, _small_summary(shapes)
    return "unknown", None, {}, [f"unrecognised tensor names, e.g. {', '.join(keys[:3]) or '(none)'}"] + \
        _prefix_summary(shapes, 1)[:10]


# ---------------------------------------------------------------- pickles with non-tensor structure


def flatten_tensors(obj: Any, prefix: str = "", out: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """All tensors in nested dicts/lists, keyed by dotted path (for A1111 .pt files that are not flat)."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            flatten_tensors(v, f"{prefix}{k}.", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten_tensors(v, f"{prefix}{i}.", out)
    return out


def _scalars(obj: Mapping[Any, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in obj.items()
            if isinstance(v, (str, int, float, bool, list, tuple)) and not isinstance(k, int)
            and not (isinstance(v, (list, tuple)) and any(isinstance(x, (dict, torch.Tensor)) for x in v))
            and k != "optimizer_state_dict"}


def _classify_pickle(obj: Any) -> tuple[str, str | None, dict, list, dict[str, str]] | None:
    """A1111 textual inversion (.pt with string_to_param) and hypernetworks (.pt keyed by layer width)."""
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("string_to_param"), Mapping):
        params = {str(k): v for k, v in obj["string_to_param"].items() if isinstance(v, torch.Tensor)}
        shapes = {f"string_to_param.{k}": tuple(v.shape) for k, v in params.items()}
        first = next(iter(params.values()), None)
        width = int(first.shape[-1]) if first is not None else 0
        vectors = int(first.shape[0]) if first is not None and first.ndim == 2 else 1
        return ("embedding", _width_family(width), {"vectors": vectors, "width": width, "format": "A1111 .pt"},
                _small_summary(shapes), _scalars(obj))
    sizes = [k for k in obj if isinstance(k, int)]
    if sizes and all(isinstance(obj[k], (list, tuple)) for k in sizes) and (set(sizes) <= set(_HN_SIZES) or all(
            k > 0 and len(obj[k]) == 2 and all(isinstance(d, Mapping) for d in obj[k]) for k in sizes)):
        family = "sd2" if 1024 in sizes else ("sd1" if 768 in sizes else None)
        flat = flatten_tensors({k: obj[k] for k in sizes})
        shapes = {k: tuple(v.shape) for k, v in flat.items()}
        summary = [f"layer sizes: {', '.join(map(str, sorted(sizes)))}"] + _small_summary(shapes, 6)
        return "hypernetwork", family, {"sizes": sorted(sizes)}, summary, _scalars(obj)
    return None


# ---------------------------------------------------------------- folders


def _identify_folder(p: Path) -> FileInfo:
    from sdtune.models.loading import folder_family

    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in WEIGHT_EXTS)
    count = params = 0
    dtypes: Counter = Counter()
    for f in files:
        if f.suffix.lower() in SAFETENSORS_EXTS:
            infos, _ = read_safetensors_header(f)
            count += len(infos)
            params += sum(_numel(i.shape) for i in infos.values())
            dtypes.update(i.dtype for i in infos.values())
    if (p / "model_index.json").is_file():
        family, pred = folder_family(p)
        index = json.loads((p / "model_index.json").read_text())
        comps = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
        summary = [f"pipeline: {index.get('_class_name')}", f"components: {', '.join(comps)}",
                   f"prediction type: {pred}"] + [f"{f.relative_to(p)} ({f.stat().st_size / 1e6:.1f} MB)"
                                                  for f in files]
        return FileInfo(p, "diffusers", family, "diffusers-folder", count, params, dict(dtypes), summary, {},
                        {"pipeline": index.get("_class_name"), "components": comps, "prediction_type": pred})
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError:
            cfg = {}
        cls = str(cfg.get("_class_name") or (cfg.get("architectures") or [""])[0])
        kind = {"AutoencoderKL": "vae", "UNet2DConditionModel": "unet"}.get(cls, "text_encoder" if "CLIP" in cls
                                                                           else "unknown")
        return FileInfo(p, kind, None, "diffusers-folder", count, params, dict(dtypes),
                        [f"class: {cls or 'unknown'}"], {}, {"class": cls})
    raise SdtuneError(f"{p} is a directory but not a diffusers folder (no model_index.json or config.json); "
                      "pass a weight file or a diffusers folder")


# ---------------------------------------------------------------- entry point


def identify(path: str | Path) -> FileInfo:
    """Classify a weight file or diffusers folder: kind, family guess, tensor count, shapes summary, metadata."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _identify_folder(p)
    if p.suffix.lower() in (".png", ".webp") and p.is_file():
        return _identify_image_embedding(p)
    p = check_file(p)
    if p.suffix.lower() in SAFETENSORS_EXTS:
        infos, meta = read_safetensors_header(p)
        shapes = {k: i.shape for k, i in infos.items()}
        dtypes = Counter(i.dtype for i in infos.values())
        kind, family, details, summary = classify_tensors(shapes, meta)
        fmt = "safetensors"
    else:
        assert p.suffix.lower() in PICKLE_EXTS
        raw = load_pickle(p)
        special = _classify_pickle(raw)
        fmt = "pickle"
        if special is not None:
            kind, family, details, summary, meta = special
            flat = flatten_tensors({k: v for k, v in raw.items() if isinstance(k, int)} if kind == "hypernetwork"
                                   else raw["string_to_param"])
        else:
            obj = unwrap_state_dict(raw)
            if not isinstance(obj, Mapping):
                raise SdtuneError(f"{p.name} holds a {type(obj).__name__}, not weights; it is not a model file")
            flat = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            meta = _scalars(raw) if isinstance(raw, Mapping) else {}
            if not flat:
                raise SdtuneError(f"{p.name} contains no tensors; it is not a model file")
            kind, family, details, summary = classify_tensors({k: tuple(v.shape) for k, v in flat.items()}, meta)
        shapes = {k: tuple(v.shape) for k, v in flat.items()}
        dtypes = Counter(str(v.dtype).replace("torch.", "") for v in flat.values())
    if kind == "embedding":
        from sdtune.adapters.textual_inversion.diffusers_pair import pair_of

        pair = pair_of(p)
        if pair is not None:  # half of one SDXL embedding: say so, and what it reads as
            family = "sdxl"
            details = {**details, "diffusers_sdxl_pair": [str(pair[0]), str(pair[1])]}
            summary = summary + [f"diffusers SDXL pair: {pair[0].name} (CLIP-L) + {pair[1].name} (OpenCLIP-G) are "
                                 "read as one SDXL embedding (clip_l + clip_g); `sdtune convert` makes one file"]
    return FileInfo(p, kind, family, fmt, len(shapes), sum(_numel(s) for s in shapes.values()), dict(dtypes),
                    summary, dict(meta), details)


def _identify_image_embedding(p: Path) -> FileInfo:
    """A1111's image embeddings: the embedding dict in the PNG/WebP's text chunk, or in its pixels when the chunk
    was stripped (as A1111 reads it). An ordinary image is a one-line error."""
    from sdtune.adapters.textual_inversion.files import read_embedding

    emb = read_embedding(p)
    shapes = {k: tuple(v.shape) for k, v in emb.vectors.items()}
    widths = sorted({s[-1] for s in shapes.values()})
    family = "sdxl" if emb.is_sdxl() else _width_family(widths[0]) if widths else None
    summary = [f"textual inversion embedding {emb.name!r} in an image: {emb.num_vectors} vector(s), {emb.shapes()}"]
    if emb.step is not None:
        summary.append(f"step: {emb.step}")
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in emb.vectors.values())
    return FileInfo(p, "embedding", family, "png", len(shapes), sum(_numel(s) for s in shapes.values()),
                    dict(dtypes), summary, dict(emb.metadata), {"name": emb.name, "vectors": emb.num_vectors})

