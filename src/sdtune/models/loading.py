"""`load_model()`: one entry point that turns `tiny`, a diffusers folder or a single checkpoint file into a
ready pipeline plus the facts other code needs (family, prediction type, A1111 model hash)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from sdtune.errors import SdtuneError
from sdtune.models.bundled import BUNDLED_MODEL, bundled_model_path, is_bundled_model
from sdtune.models.device import resolve_device_dtype

if TYPE_CHECKING:
    # the defining module: under TYPE_CHECKING, `diffusers.DiffusionPipeline` resolves to diffusers' dummy
    # placeholder class (its __init__ binds utils.dummy_pt_objects first), which has none of the pipeline's API
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

PREDICTION_TYPES = ("epsilon", "v_prediction")
_PRED_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction",
                 "v-prediction": "v_prediction", "vpred": "v_prediction", "v_pred": "v_prediction"}


@dataclass
class LoadedModel:
    """A loaded pipeline and what is known about it."""

    pipe: DiffusionPipeline
    family: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner"
    prediction_type: str  # "epsilon" | "v_prediction"
    name: str  # file stem, folder name, or "tiny"
    hash: str  # A1111 "Model hash" (10 hex chars)
    source: Path
    device: torch.device
    dtype: torch.dtype


def normalize_prediction_type(value: str | None) -> str | None:
    """Map user spellings ("v", "eps", "v_prediction" ...) to diffusers' names; None stays None."""
    if value is None:
        return None
    key = str(value).strip().lower()
    if key not in _PRED_ALIASES:
        raise SdtuneError(f"unknown prediction type {value!r}; use epsilon or v_prediction")
    return _PRED_ALIASES[key]


def resolve_spec(spec: str | Path | None) -> tuple[Path, str]:
    """(path, display name) for a model spec: None/"tiny", a diffusers folder, or a weight file."""
    if is_bundled_model(spec):
        return bundled_model_path(), BUNDLED_MODEL
    assert spec is not None  # None names the bundled model
    p = Path(spec).expanduser()
    if not p.exists():
        hint = " (sdtune never downloads; pass a local path)" if "/" in str(spec) and not str(spec).startswith(
            (".", "/", "~")) else ""
        raise SdtuneError(f"model {str(spec)!r} not found{hint}; pass a diffusers folder, a .safetensors/.ckpt "
                          "file, or `tiny`")
    return p, (p.name if p.is_dir() else p.stem)


def folder_family(folder: Path) -> tuple[str, str]:
    """(family, prediction_type) of a diffusers pipeline folder from its configs, without loading weights."""
    index = _read_json(folder / "model_index.json")
    cls = str(index.get("_class_name", ""))
    sched = _read_json(folder / "scheduler" / "scheduler_config.json") if (folder / "scheduler").is_dir() else {}
    pred = normalize_prediction_type(sched.get("prediction_type", "epsilon")) or "epsilon"
    if "XL" in cls:
        te1 = index.get("text_encoder")
        refiner = not te1 or te1 == [None, None] or bool(index.get("requires_aesthetics_score"))
        return ("sdxl-refiner" if refiner else "sdxl"), pred
    if cls.startswith("StableDiffusion"):
        te = _read_json(folder / "text_encoder" / "config.json") if (folder / "text_encoder").is_dir() else {}
        unet = _read_json(folder / "unet" / "config.json") if (folder / "unet").is_dir() else {}
        openclip = te.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024
        return ("sd2" if openclip else "sd1"), pred
    raise SdtuneError(f"{folder} holds a {cls or 'unknown'} pipeline; sdtune supports Stable Diffusion 1.x, 2.x "
                      "and SDXL pipelines")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SdtuneError(f"{path.parent} is not a diffusers pipeline folder (no {path.name}); pass a folder "
                          "saved with save_pretrained, or a .safetensors/.ckpt file") from None
    except (OSError, ValueError) as exc:
        raise SdtuneError(f"{path} is unreadable ({str(exc).splitlines()[0][:120]}); fix or re-export it") from None
    if not isinstance(data, dict):
        raise SdtuneError(f"{path} is not a JSON object; fix or re-export the model folder")
    return data


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers'/transformers' per-component loading progress bars (they clutter CLI output)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def _load_folder(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    index = _read_json(folder / "model_index.json")
    from diffusers.utils import deprecation_utils

    # diffusers renamed torch_dtype -> dtype (and warns about the old name); older releases only know torch_dtype
    dtype_arg = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_arg: dtype, "local_files_only": True}
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        with quiet_loading():
            return DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, EnvironmentError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SdtuneError(f"could not load the diffusers folder {folder} ({first}); check that it is complete") \
            from None


def load_model(spec: str | Path | None = None, *, vae: str | Path | None = None, device: str | None = None,
               dtype: str | None = None, prediction_type: str | None = None) -> LoadedModel:
    """Load `tiny` (spec None), a diffusers folder or a single .safetensors/.ckpt checkpoint, from local files only.

    `vae` swaps in another VAE (diffusers folder or single file); `prediction_type` overrides the detected one
    (needed for SD2 checkpoints whose parameterization cannot be read from the weights)."""
    dev, dt = resolve_device_dtype(device, dtype)
    pred_override = normalize_prediction_type(prediction_type)
    path, name = resolve_spec(spec)
    if path.is_dir():
        from sdtune.models.hashing import folder_hash

        family, pred = folder_family(path)
        pipe = _load_folder(path, dt)
        model_hash = folder_hash(path)
    else:
        from sdtune.models.hashing import file_hash
        from sdtune.models.single_file import load_single_file

        pipe, family, pred = load_single_file(path, dtype=dt, prediction_type=pred_override)
        model_hash = file_hash(path)
    if pred_override and pred_override != pred:
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=pred_override)
        pred = pred_override
    if vae is not None:
        from sdtune.models.vae import load_vae

        pipe.vae = load_vae(vae, family=family, dtype=dt, like=pipe.vae)
    if family.startswith("sdxl") and dt == torch.float16 and getattr(pipe, "vae", None) is not None:
        if "force_upcast" not in pipe.vae.config or pipe.vae.config.force_upcast is None:
            pipe.vae.register_to_config(force_upcast=True)  # the SDXL VAE overflows in fp16 -> black images
    pipe = pipe.to(dev)
    return LoadedModel(pipe=pipe, family=family, prediction_type=pred, name=name, hash=model_hash,
                       source=path, device=dev, dtype=dt)
