"""Tell SD1 / SD2 / SDXL / SDXL-refiner apart from the weights of an original-layout (LDM, A1111) checkpoint.

Detection is structural (which text encoders are present, and how), so it also works on small test models;
shapes are only used when a file carries no text encoder at all.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from sdtune.errors import SdtuneError

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
# kohya's `ss_base_model_version` metadata for each family (what A1111's and kohya's tools read in LoRA files)
KOHYA_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def family_of_components(components: Mapping[str, Any]) -> str | None:
    """sd1/sd2/sdxl/sdxl-refiner from loaded pipeline components (the one place that knows it): two text encoders
    are SDXL, the second alone an SDXL refiner; SD2's text encoder uses gelu, SD1's quick_gelu; a bare UNet is told
    by its cross-attention width and added conditioning."""
    if components.get("text_encoder_2") is not None:
        return "sdxl" if components.get("text_encoder") is not None else "sdxl-refiner"
    te = components.get("text_encoder")
    if te is not None:
        return "sd2" if getattr(getattr(te, "config", None), "hidden_act", "") == "gelu" else "sd1"
    unet = components.get("unet")
    if unet is not None:
        cfg = unet.config
        return {(768, None): "sd1", (1024, None): "sd2", (2048, "text_time"): "sdxl",
                (1280, "text_time"): "sdxl-refiner"}.get((cfg.cross_attention_dim, cfg.addition_embed_type))
    return None


def family_from_kohya_version(value: str | None) -> str | None:
    """The family an `ss_base_model_version` names (kohya writes e.g. sd_v1, sd_v2_768_v, sdxl_base_v1-0)."""
    base = str(value or "").lower()
    for prefix, family in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if base.startswith(prefix):
            return family
    return None

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_EMBEDDER_PREFIX = "conditioner.embedders."


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", value)
    try:
        return tuple(int(s) for s in shape)
    except TypeError:
        return ()


def as_shapes(state_dict_keys_and_shapes: Mapping[str, Any] | Iterable[tuple[str, Any]] | Iterable[str]
              ) -> dict[str, tuple[int, ...]]:
    """Normalise a state dict, a {key: shape} map, (key, shape) pairs or bare keys to {key: shape}."""
    if isinstance(state_dict_keys_and_shapes, Mapping):
        return {str(k): _shape(v) for k, v in state_dict_keys_and_shapes.items()}
    out: dict[str, tuple[int, ...]] = {}
    for item in state_dict_keys_and_shapes:
        if isinstance(item, str):
            out[item] = ()
        else:
            k, v = item
            out[str(k)] = _shape(v)
    return out


def _has(shapes: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _context_dim(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for k, s in shapes.items():
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and len(s) == 2:
            return s[1]
    return None


def detect_family(state_dict_keys_and_shapes: Mapping[str, Any] | Iterable[tuple[str, Any]] | Iterable[str]) -> str:
    """Return "sd1", "sd2", "sdxl" or "sdxl-refiner" for an original-layout checkpoint, else raise SdtuneError.

    Rules: SD1 has a HF-CLIP text encoder under `cond_stage_model.transformer.*`; SD2 an OpenCLIP one under
    `cond_stage_model.model.*`; SDXL base has `conditioner.embedders.0.transformer.*` (CLIP-L) and
    `conditioner.embedders.1.model.*` (OpenCLIP bigG); the refiner only `conditioner.embedders.0.model.*`
    (bigG). A UNet-only file is classified by its cross-attention width (768/1024/2048/1280) and `label_emb`.
    """
    shapes = as_shapes(state_dict_keys_and_shapes)
    has_unet = _has(shapes, UNET_PREFIX)
    emb0_clip = _has(shapes, SDXL_EMBEDDER_PREFIX + "0.transformer.")
    emb0_open = _has(shapes, SDXL_EMBEDDER_PREFIX + "0.model.")
    emb1_open = _has(shapes, SDXL_EMBEDDER_PREFIX + "1.model.")
    if has_unet or emb0_clip or emb0_open:
        if emb0_clip and emb1_open:
            return "sdxl"
        if emb0_open and not emb0_clip and not emb1_open:
            return "sdxl-refiner"
        if _has(shapes, SD1_TEXT_PREFIX):
            return "sd1"
        if _has(shapes, SD2_TEXT_PREFIX):
            return "sd2"
        ctx = _context_dim(shapes)
        label_emb = _has(shapes, UNET_PREFIX + "label_emb.")
        by_ctx = {(768, False): "sd1", (1024, False): "sd2", (2048, True): "sdxl", (1280, True): "sdxl-refiner"}
        if ctx is not None and (ctx, label_emb) in by_ctx:
            return by_ctx[(ctx, label_emb)]
    found = sorted({".".join(k.split(".")[:2]) for k in shapes})[:6]
    raise SdtuneError("not a Stable Diffusion 1/2/XL checkpoint in the original (A1111) layout: found "
                      f"{len(shapes)} tensors with prefixes {', '.join(found) or '(none)'}; "
                      "run `sdtune info FILE` to see what it is")
