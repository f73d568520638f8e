"""What to generate (`GenerationParams`), its validation, and its mapping to/from A1111 infotext fields.

Validation happens here, before any model is loaded, so a typo costs nothing and writes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from sdtune.version import __version__
from sdtune.errors import SdtuneError
from sdtune.generate.pnginfo import Infotext, format_infotext
from sdtune.generate.samplers import check_sampler, normalize_sampler_name

# A1111 >= 1.8 defaults to "DPM++ 2M" with the Karras schedule: converges (unlike "Euler a", A1111's old
# default), so more steps refine the same picture, and it is good at 20 steps.
DEFAULT_SAMPLER = "DPM++ 2M Karras"
MAX_SEED = 2**32 - 1  # A1111's random seeds are 32-bit; larger explicit seeds are still accepted
_SEED_LIMIT = 2**63
# bounds of one run, shared with the HTTP API (server/a1111_models.py): larger values are refused before loading
MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_BATCH_SIZE = 64
MAX_BATCH_COUNT = 1000
MAX_CLIP_SKIP = 12  # SD1/SD2/SDXL text encoders have 12 to 32 layers; the model's own count is checked on encoding


@dataclass
class GenerationParams:
    """Settings for one txt2img run, with A1111's meanings and defaults.

    width/height None mean the model's native size. seed -1 picks a random seed; image i of the run (over all
    batches) gets seed + i. clip_skip uses A1111's numbering (1 = last CLIP layer, 2 = the one before).
    refiner is a model spec or name; refiner_start the fraction of denoising done by the base model.
    prompt_syntax: auto, a1111 or compel; emphasis: auto, original, none or compel (see docs/prompts.md)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    sampler: str = DEFAULT_SAMPLER
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    refiner: str | None = None
    refiner_start: float = 0.8
    prompt_syntax: str = "auto"
    emphasis: str = "auto"

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    @property
    def total_images(self) -> int:
        return self.batch_size * self.batch_count

    def validate(self) -> GenerationParams:
        """Raise SdtuneError on the first bad setting; returns self with the sampler name canonicalised."""
        _check_int("steps", self.steps, 1, MAX_STEPS, "use at least 1 (20 is typical)")
        _check_int("batch size", self.batch_size, 1, MAX_BATCH_SIZE, "use 1 or more images per batch")
        _check_int("batch count", self.batch_count, 1, MAX_BATCH_COUNT, "use 1 or more batches")
        _check_int("clip skip", self.clip_skip, 1, MAX_CLIP_SKIP, "use 1 (last layer) or 2 (the layer before)")
        for name, value in (("width", self.width), ("height", self.height)):
            if value is None:
                continue
            _check_int(name, value, 8, MAX_SIDE, "use a positive multiple of 8 such as 512")
            if value % 8:
                raise SdtuneError(f"{name} {value} is not a multiple of 8; use e.g. {max(8, value // 8 * 8)} "
                                  f"or {(value // 8 + 1) * 8}")
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)) \
                or not math.isfinite(self.cfg_scale):
            raise SdtuneError(f"CFG scale {self.cfg_scale!r} is not a finite number; use e.g. 7")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -1 <= self.seed < _SEED_LIMIT:
            raise SdtuneError(f"seed {self.seed!r} is out of range; use -1 (random) or 0..{MAX_SEED}")
        if self.seed >= 0 and self.seed + self.total_images > _SEED_LIMIT:
            raise SdtuneError(f"seed {self.seed} + {self.total_images} images overflows; use a seed below 2**32")
        if not isinstance(self.refiner_start, (int, float)) or not 0.0 < self.refiner_start < 1.0:
            raise SdtuneError(f"refiner switch {self.refiner_start!r} must be between 0 and 1 (exclusive); "
                              "use e.g. 0.8 (base does 80% of the steps)")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise SdtuneError("prompt and negative prompt must be text")
        from sdtune.prompts.tokens import check_text

        check_text(self.prompt, "the prompt")
        check_text(self.negative_prompt, "the negative prompt")
        from sdtune.prompts.emphasis import EMPHASES
        from sdtune.prompts.syntax import SYNTAXES

        if self.prompt_syntax not in SYNTAXES:
            raise SdtuneError(f"prompt syntax {self.prompt_syntax!r} is unknown; use one of {', '.join(SYNTAXES)}")
        if self.emphasis not in EMPHASES:
            raise SdtuneError(f"emphasis {self.emphasis!r} is unknown; use one of {', '.join(EMPHASES)}")
        return self.replace(sampler=check_sampler(self.sampler).name)

    def with_seed(self) -> GenerationParams:
        """A copy whose seed is fixed (a random one when seed is -1), so the run can be recorded and repeated."""
        return self if self.seed >= 0 else self.replace(seed=random.randrange(MAX_SEED))


def _check_int(name: str, value: Any, minimum: int, maximum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SdtuneError(f"{name} {value!r} is not a whole number; {hint}")
    if value < minimum:
        raise SdtuneError(f"{name} {value} is too small (minimum {minimum}); {hint}")
    if value > maximum:
        raise SdtuneError(f"{name} {value} is too large (maximum {maximum}); use {minimum}..{maximum}")


@dataclass
class ModelInfo:
    """What the infotext says about a model: A1111 writes its name and short hash."""

    name: str
    hash: str | None = None


def infotext_for(params: GenerationParams, *, seed: int, width: int, height: int, model: ModelInfo,
                 vae: ModelInfo | None = None, refiner: ModelInfo | None = None, batch_pos: int = 0) -> str:
    """The A1111 infotext of one image, fields in A1111's order."""
    fields: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": params.sampler,
        "CFG scale": float(params.cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model.hash,
        "Model": model.name,
        "VAE hash": vae.hash if vae else None,
        "VAE": vae.name if vae else None,
        "Batch size": params.batch_size if params.batch_size > 1 else None,
        "Batch pos": batch_pos if params.batch_size > 1 else None,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None,
        "Refiner": (f"{refiner.name} [{refiner.hash}]" if refiner.hash else refiner.name) if refiner else None,
        "Refiner switch at": float(params.refiner_start) if refiner else None,
        "Prompt syntax": params.prompt_syntax if params.prompt_syntax != "auto" else None,
        "Emphasis": _EMPHASIS_NAMES.get(params.emphasis),
        "Version": f"sdtune {__version__}",
    }
    return format_infotext(params.prompt, params.negative_prompt, fields)


# infotext names (A1111's where it has the mode); "auto" and A1111's default "Original" are not written
_EMPHASIS_NAMES = {"original": "Original", "none": "No norm", "compel": "compel"}
_EMPHASIS_FROM_TEXT = {"original": "original", "no norm": "none", "compel": "compel"}


@dataclass
class Recorded:
    """Settings read back from an infotext: the params plus what identifies the models and the batch slot."""

    params: GenerationParams
    model: ModelInfo | None = None
    vae: ModelInfo | None = None
    refiner: ModelInfo | None = None
    batch_pos: int = 0
    extra: dict[str, str] = field(default_factory=dict)


_NAME_HASH = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$")


def _name_and_hash(value: str) -> ModelInfo:
    m = _NAME_HASH.match(value)
    return ModelInfo(m.group(1), m.group(2)) if m else ModelInfo(value)


def params_from_infotext(info: Infotext) -> Recorded:
    """Turn a parsed infotext into GenerationParams (batch_count 1, batch_size from the file if any)."""
    f = dict(info.fields)

    def take(key: str, convert: Any, default: Any = None) -> Any:
        if key not in f:
            return default
        raw = f.pop(key)
        try:
            return convert(raw)
        except (TypeError, ValueError):
            raise SdtuneError(f"the image's {key!r} field {raw!r} is unreadable; pass that setting as an option") \
                from None

    p = GenerationParams(prompt=info.prompt, negative_prompt=info.negative_prompt)
    changes: dict[str, Any] = {}
    changes["steps"] = take("Steps", int, p.steps)
    schedule = f.pop("Schedule type", None)
    sampler = take("Sampler", str)
    if sampler:
        changes["sampler"] = normalize_sampler_name(sampler, schedule)
    changes["cfg_scale"] = take("CFG scale", float, p.cfg_scale)
    changes["seed"] = take("Seed", int, p.seed)
    size = take("Size", lambda s: tuple(int(v) for v in s.lower().split("x")))
    if size:
        if len(size) != 2:
            raise SdtuneError(f"the image's 'Size' field {size!r} is not WIDTHxHEIGHT")
        changes["width"], changes["height"] = size
    changes["clip_skip"] = take("Clip skip", int, p.clip_skip)
    changes["batch_size"] = take("Batch size", int, 1)
    syntax = f.pop("Prompt syntax", None)
    if syntax in ("a1111", "compel"):
        changes["prompt_syntax"] = syntax
    emphasis = f.get("Emphasis")
    if emphasis is not None and emphasis.strip().lower() in _EMPHASIS_FROM_TEXT:
        changes["emphasis"] = _EMPHASIS_FROM_TEXT[f.pop("Emphasis").strip().lower()]
    batch_pos = take("Batch pos", int, 0)
    refiner = take("Refiner", _name_and_hash)
    if refiner:
        changes["refiner"] = refiner.name
        changes["refiner_start"] = take("Refiner switch at", float, p.refiner_start)
    model_hash = take("Model hash", str)
    model_name = take("Model", str)
    model = ModelInfo(model_name or "", model_hash) if (model_name or model_hash) else None
    vae_hash = take("VAE hash", str)
    vae_name = take("VAE", str)
    vae = ModelInfo(vae_name or "", vae_hash) if vae_name else None
    return Recorded(p.replace(**changes), model=model, vae=vae, refiner=refiner, batch_pos=batch_pos, extra=f)
