"""Load a single original-layout (LDM / A1111) checkpoint into a diffusers pipeline without any hub access.

What diffusers does here: the UNet and VAE come from its own `from_single_file` (key conversion, building on the
meta device, loading, dtype), given the checkpoint's state dict and a config folder (`config_folder.py`) holding
their configs; text encoders are converted with its `single_file_utils` CLIP converters. A checkpoint of the
shipped configs' sizes loads identically through `Pipeline.from_single_file(ckpt, config=<models/configs/FAMILY>,
local_files_only=True)` (tests/test_single_file_diffusers.py).

What sdtune keeps, because diffusers lacks it:
- reading: one pass through `formats.safe_io` (safetensors headers validated; pickles only with weights_only=True,
  refused with one line), then the dict goes to diffusers, which never opens the file (its own reader also uses
  weights_only=True in 0.42, but reports damage as multi-line hub errors);
- the old HF-CLIP key layout some SD1 files use (`normalize_ldm_keys`): diffusers looks for
  `...transformer.text_model.*` only and would report the text encoder missing;
- the family from the keys' structure (`family.detect_family`); diffusers' `infer_diffusers_model_type` tells
  families apart by widths (768/1024/2048 cross-attention) and so misreads small models;
- configs: from the file's `sdtune.config` metadata or read off the tensor shapes (`infer.py`); diffusers only
  maps a checkpoint to a hub repository's configs, or needs the original LDM yaml;
- prediction type and SD2's 512/768 rules, `v_pred` / `ztsnr` markers, the offline CLIP tokenizers;
- text encoder dispatch by key prefix: diffusers' `create_diffusers_clip_model_from_ldm` picks CLIP-L or
  OpenCLIP-bigG for SDXL's second encoder by comparing widths (equal widths, as in `models.testing`'s tiny SDXL,
  load CLIP-L's weights into it), and cannot take meta tensors (the full-size shape checks in the tests);
- completeness: diffusers leaves weights the file lacks on the meta device; here that is one SdtuneError.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch

from sdtune.errors import SdtuneError
from sdtune.formats.safe_io import read_safetensors_header, read_state_dict
from sdtune.models import infer
from sdtune.models.family import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, detect_family

# Keys of the safetensors metadata that `sdtune.formats.checkpoint.save_single_file` writes.
META_CONFIG = "sdtune.config"
META_TOKENIZER = "sdtune.tokenizer"
META_TOKENIZER_2 = "sdtune.tokenizer_2"

_V = TypeVar("_V")
_OPENCLIP_PREFIX = {"sd2": SD2_TEXT_PREFIX, "sdxl": "conditioner.embedders.1.model.",
                    "sdxl-refiner": "conditioner.embedders.0.model."}
_CLIP_PREFIX = {"sd1": SD1_TEXT_PREFIX, "sdxl": "conditioner.embedders.0.transformer."}


def normalize_ldm_keys(sd: Mapping[str, _V]) -> dict[str, _V]:
    """Fix the old HF-CLIP layout some SD1 files use (`...transformer.embeddings.*` without `text_model.`)."""
    out = {}
    for k, v in sd.items():
        for prefix in _CLIP_PREFIX.values():
            if k.startswith(prefix) and not k.startswith(prefix + "text_model."):
                k = prefix + "text_model." + k[len(prefix):]
        out[k] = v
    return out


def _meta_json(meta: Mapping[str, str], key: str) -> dict[str, Any] | None:
    if key not in meta:
        return None
    try:
        data = json.loads(meta[key])
    except ValueError:
        raise SdtuneError(f"the file's {key!r} metadata is not valid JSON; re-export the checkpoint") from None
    return data if isinstance(data, dict) else None


def resolve_prediction_type(path: Path, family: str, meta: Mapping[str, str],
                            override: str | None, keys: Any = ()) -> tuple[str, int | None]:
    """(prediction_type, UNet sample_size or None) for a checkpoint.

    Order: explicit override; A1111's sidecar `<stem>.yaml` (`parameterization: "v"`); safetensors metadata
    (`modelspec.prediction_type`, kohya's `ss_v_parameterization`); an empty `v_pred` marker tensor (the
    convention of v-prediction SDXL finetunes); then the family default. SD2's two official
    releases differ only in training, not in weights: 768-v (v_prediction, 768 px) and 512-base (epsilon, 512 px).
    The default is v_prediction at 768 px (the 2.0-v/2.1 release most SD2 models derive from) unless the file name
    says 512 or "base", matching the official file names (v2-1_512-ema-pruned, 512-base-ema)."""
    def size_for(pred: str) -> int | None:
        if family != "sd2":
            return None
        return 96 if pred == "v_prediction" else 64

    if override:
        return override, size_for(override)
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        try:
            text = sidecar.read_text(errors="replace")
        except OSError:
            text = ""
        m = re.search(r"parameterization\s*:\s*['\"]?(\w+)", text)
        if m:
            pred = "v_prediction" if m.group(1).lower() in ("v", "v_prediction") else "epsilon"
            return pred, size_for(pred)
    spec = meta.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "epsilon", "eps"):
        pred = "v_prediction" if spec.startswith("v") else "epsilon"
        return pred, size_for(pred)
    if meta.get("ss_v_parameterization", "").strip().lower() == "true" or "v_pred" in keys:
        return "v_prediction", size_for("v_prediction")
    if family == "sd2":
        stem = path.stem.lower()
        pred = "epsilon" if ("512" in stem or "base" in stem) and "768" not in stem else "v_prediction"
        return pred, size_for(pred)
    return "epsilon", None


def _tokenizer(meta: Mapping[str, str], key: str, family: str, component: str, vocab_size: int) -> Any:
    from sdtune.models.tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer, tokenizer_from_files

    spec = _meta_json(meta, key)
    if spec is not None:
        return tokenizer_from_files(spec["vocab"], spec["merges"], spec.get("special", {}))
    if vocab_size != CLIP_VOCAB_SIZE:
        raise SdtuneError(f"the text encoder has a {vocab_size}-token vocabulary, not CLIP's {CLIP_VOCAB_SIZE}, "
                          "and the file carries no tokenizer; convert it from its diffusers folder instead")
    tcfg = infer.family_config(family, component)
    return clip_tokenizer(pad_token=tcfg.get("pad_token", "<|endoftext|>"),
                          model_max_length=int(tcfg.get("model_max_length", 77)))


def _instantiate(factory: Any, state: Mapping[str, torch.Tensor], what: str,
                 remap: Any = None) -> Any:
    """Build a module on the meta device and assign the converted weights, refusing incomplete weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    if remap is not None:
        state = remap(model, state)
    expected = model.state_dict()
    usable = {k: v for k, v in state.items() if k in expected}
    bad = [k for k, v in usable.items() if tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in usable and not k.endswith("position_ids")]
    if bad or missing:
        sample = (bad or missing)[:3]
        raise SdtuneError(f"the {what} weights do not fit the inferred architecture ({len(missing)} missing, "
                          f"{len(bad)} mis-shaped, e.g. {', '.join(sample)}); the file is damaged or mixes models")
    model.load_state_dict(usable, strict=False, assign=True)
    return model.eval()


def load_with_diffusers(cls: Any, sd: Mapping[str, torch.Tensor], folder: Path, subfolder: str, what: str,
                        dtype: torch.dtype | None = None) -> Any:
    """`cls.from_single_file` (UNet2DConditionModel / AutoencoderKL) on an LDM state dict with `folder/subfolder`'s
    config, offline. A state dict of meta tensors (shape checks of full-size layouts) builds a meta model."""
    from diffusers.utils import logging as dlog

    on_meta = next(iter(sd.values())).is_meta if sd else False
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its dtype cast warns about fp32-kept modules even when the list is empty
    try:
        model = cls.from_single_file(dict(sd), config=str(folder), subfolder=subfolder, local_files_only=True,
                                     torch_dtype=dtype, device="meta" if on_meta else None)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise SdtuneError(f"the {what} weights do not fit the inferred architecture ({first}); the file is damaged "
                          "or mixes models") from None
    finally:
        dlog.set_verbosity(level)
    missing = [] if on_meta else [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SdtuneError(f"the {what} weights do not fit the inferred architecture ({len(missing)} missing, e.g. "
                          f"{', '.join(missing[:3])}); the file is damaged or mixes models")
    model.__dict__.pop("hf_device_map", None)  # diffusers' one-device map: nothing to dispatch
    return model


def _text_model_keys(model: Any, converted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' converters emit `text_model.*`; transformers>=5.6 CLIPTextModel has no such wrapper."""
    if hasattr(model, "text_model"):
        return dict(converted)
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


def clip_config_for(shapes: infer.Shapes, family: str, component: str, tokenizer: Any,
                    openclip_prefix: str | None) -> dict[str, Any]:
    """CLIPTextConfig kwargs for one text encoder: the family's config adjusted to the weights and tokenizer."""
    base = infer.family_config(family, component)
    base.pop("architectures", None)
    if openclip_prefix is None:
        cfg = infer.clip_config(shapes, base, _CLIP_PREFIX[family] + "text_model.")
    else:
        cfg = infer.openclip_config(shapes, base, openclip_prefix, drop_last=(family == "sd2"))
    cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return cfg


def build_clip(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], family: str, openclip_prefix: str | None,
               with_projection: bool) -> Any:
    """Convert and load one text encoder (HF-CLIP layout when openclip_prefix is None, else OpenCLIP)."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"})
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    if openclip_prefix is None:
        prefix = _CLIP_PREFIX[family]
        converted = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(prefix)},
                                                remove_prefix=prefix)
    else:
        sub = {k: v for k, v in sd.items() if k.startswith(openclip_prefix)}
        # the converter reads config.hidden_size only when the file has no text_projection
        converted = convert_open_clip_checkpoint(SimpleNamespace(config=config), sub, prefix=openclip_prefix)
    what = "second text encoder" if with_projection and family == "sdxl" else "text encoder"
    return _instantiate(lambda: cls(config), converted, what, remap=_text_model_keys)


def _scheduler(family: str, pred: str, meta_cfg: Mapping[str, Any] | None) -> Any:
    import diffusers

    cfg = dict(meta_cfg["scheduler"]) if meta_cfg and "scheduler" in meta_cfg else infer.family_config(
        family, "scheduler")
    cls = getattr(diffusers, cfg.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
    cfg["prediction_type"] = pred
    return cls.from_config(cfg)


def load_single_file(path: str | Path, *, dtype: torch.dtype = torch.float32,
                     prediction_type: str | None = None) -> tuple[Any, str, str]:
    """(pipeline, family, prediction_type) for an original-layout .safetensors/.ckpt checkpoint."""
    p = Path(path)
    sd = normalize_ldm_keys(read_state_dict(p))
    meta = read_safetensors_header(p)[1] if p.suffix.lower() == ".safetensors" else {}
    if any(k.startswith("model.diffusion_model.") for k in sd) and not any(
            k.startswith("first_stage_model.") for k in sd):
        raise SdtuneError(f"{p.name} has no VAE weights (first_stage_model.*); it looks like a UNet-only file, "
                          "which sdtune cannot load as a model; use a full checkpoint")
    family = detect_family(sd)
    pred, sample_size = resolve_prediction_type(p, family, meta, prediction_type, keys=sd.keys())
    components = components_from_state_dict(sd, family, meta=meta, prediction_type=pred, sample_size=sample_size,
                                            name=p.name, dtype=dtype)
    del sd
    return build_pipeline(family, components), family, pred


def write_checkpoint_config_folder(path: str | Path, dest: str | Path, *,
                                   prediction_type: str | None = None) -> Path:
    """Write the diffusers config folder that fits the checkpoint at `path` (configs as `load_model` resolves them,
    tokenizers, scheduler, model_index.json) into `dest`, so diffusers' own loader builds the same model offline:
    `Pipeline.from_single_file(path, config=dest, local_files_only=True)`. Reads only the header of a .safetensors.
    (diffusers itself still needs the current `...text_model.*` CLIP key layout, and SDXL text encoders of
    different widths; see the module docstring.)"""
    from sdtune.formats.safe_io import read_shapes
    from sdtune.models.config_folder import write_config_folder

    p = Path(path)
    shapes, meta = read_shapes(p)
    shapes = normalize_ldm_keys(shapes)
    family = detect_family(shapes)
    pred, sample_size = resolve_prediction_type(p, family, meta, prediction_type, keys=shapes.keys())
    configs, tokenizers, scheduler = checkpoint_configs(shapes, family, meta=meta, prediction_type=pred,
                                                        sample_size=sample_size, name=p.name)
    return write_config_folder(dest, family, configs, tokenizers, scheduler)


def checkpoint_configs(shapes: infer.Shapes, family: str, *, meta: Mapping[str, str] | None = None,
                       prediction_type: str = "epsilon", sample_size: int | None = None,
                       name: str = "the checkpoint") -> tuple[dict[str, dict[str, Any]], dict[str, Any], Any]:
    """(configs of unet, vae, text_encoder[_2]; tokenizer[_2] objects; scheduler) of an original-layout checkpoint,
    from `meta` (sdtune.config, written by save_single_file) or inferred from the tensor shapes."""
    meta = meta or {}
    cfgs = _meta_json(meta, META_CONFIG) or {}
    unet_cfg = dict(cfgs["unet"]) if "unet" in cfgs else infer.unet_config(shapes, family)
    if unet_cfg["in_channels"] != 4:
        raise SdtuneError(f"{name} is an inpainting/instruct-pix2pix style model ({unet_cfg['in_channels']} "
                          "input channels); only text-to-image checkpoints are supported")
    vae_cfg = dict(cfgs["vae"]) if "vae" in cfgs else infer.vae_config(shapes, family)
    if sample_size and "unet" not in cfgs:
        unet_cfg["sample_size"] = sample_size
        vae_cfg["sample_size"] = sample_size * 8
    configs: dict[str, dict[str, Any]] = {"unet": unet_cfg, "vae": vae_cfg}
    tokenizers: dict[str, Any] = {}
    if family in ("sd1", "sd2", "sdxl"):
        oc_prefix = _OPENCLIP_PREFIX["sd2"] if family == "sd2" else None
        emb_key = (oc_prefix + "token_embedding.weight" if oc_prefix
                   else _CLIP_PREFIX[family] + "text_model.embeddings.token_embedding.weight")
        tok = _tokenizer(meta, META_TOKENIZER, family, "tokenizer", shapes.get(emb_key, (0,))[0])
        configs["text_encoder"] = dict(cfgs.get("text_encoder") or clip_config_for(shapes, family, "text_encoder",
                                                                                  tok, oc_prefix))
        tokenizers["tokenizer"] = tok
    if family in ("sdxl", "sdxl-refiner"):
        prefix2 = _OPENCLIP_PREFIX[family]
        tok2 = _tokenizer(meta, META_TOKENIZER_2, family, "tokenizer_2",
                          shapes.get(prefix2 + "token_embedding.weight", (0,))[0])
        te2_cfg = dict(cfgs.get("text_encoder_2") or clip_config_for(shapes, family, "text_encoder_2", tok2,
                                                                      prefix2))
        configs["text_encoder_2"] = te2_cfg
        tokenizers["tokenizer_2"] = tok2
        if "unet" not in cfgs:
            infer.set_addition_time_embed_dim(unet_cfg, int(te2_cfg.get("projection_dim", 512)), family)
    for cfg in (unet_cfg, vae_cfg):
        cfg.pop("_class_name", None)
    scheduler = _scheduler(family, prediction_type, cfgs)
    if "ztsnr" in shapes:  # marker of models trained with zero terminal SNR: sample with the matching schedule
        if "rescale_betas_zero_snr" in inspect.signature(type(scheduler).__init__).parameters:
            scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
    return configs, tokenizers, scheduler


def components_from_state_dict(sd: Mapping[str, torch.Tensor], family: str, *, meta: Mapping[str, str] | None = None,
                               prediction_type: str = "epsilon", sample_size: int | None = None,
                               name: str = "the checkpoint", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Pipeline components (unet, vae, text encoder(s), tokenizer(s), scheduler) from an original-layout state
    dict (see `checkpoint_configs`); `dtype` None loads float32."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdtune.models.config_folder import write_model_configs

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    configs, tokenizers, scheduler = checkpoint_configs(shapes, family, meta=meta, prediction_type=prediction_type,
                                                        sample_size=sample_size, name=name)
    components: dict[str, Any] = {**tokenizers, "scheduler": scheduler}
    for te_name, prefix in (("text_encoder", _OPENCLIP_PREFIX["sd2"] if family == "sd2" else None),
                            ("text_encoder_2", _OPENCLIP_PREFIX.get(family))):
        if te_name in configs:
            te = build_clip(sd, configs[te_name], family, prefix, te_name == "text_encoder_2")
            components[te_name] = te if dtype is None else te.to(dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="sdtune-config-") as tmp:
        write_model_configs(Path(tmp), configs)
        components["unet"] = load_with_diffusers(UNet2DConditionModel, sd, Path(tmp), "unet", "UNet", dtype)
        components["vae"] = load_with_diffusers(AutoencoderKL, sd, Path(tmp), "vae", "VAE", dtype)
    return components


def build_pipeline(family: str, c: Mapping[str, Any]) -> Any:
    """Assemble the diffusers pipeline class for `family` from loaded components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if family in ("sd1", "sd2"):
        return StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                       unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        return StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                         text_encoder_2=c["text_encoder_2"], tokenizer=c["tokenizer"],
                                         tokenizer_2=c["tokenizer_2"], unet=c["unet"], scheduler=c["scheduler"])
    return StableDiffusionXLImg2ImgPipeline(vae=c["vae"], text_encoder=None, text_encoder_2=c["text_encoder_2"],
                                            tokenizer=None, tokenizer_2=c["tokenizer_2"], unet=c["unet"],
                                            scheduler=c["scheduler"], requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)
