"""The checks of a `TrainConfig` before anything loads: value ranges and combinations (`check_values`, no files),
then files and folders (`check_paths`). Each failure is one SdtuneError line that says what to pass instead.

Why a module of its own: the schema (`training.config`) says what the settings are; this says which values and
combinations cannot mean what they say, and it grows with every option that can be misused.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.errors import SdtuneError
from sdtune.models.bundled import is_bundled_model
from sdtune.paths import check_readable, check_writable_dir
from sdtune.training.options import NoOptions

if TYPE_CHECKING:
    from sdtune.training.config import TrainConfig
    from sdtune.training.methods.base import TrainingMethod

RUN_ENTRIES = ("state", "checkpoints", "samples", "class_images", "cv")  # a run folder's own entries
# whole-number settings and their least value
MINIMUMS = {"batch_size": 1, "grad_accum": 1, "warmup_steps": 0, "save_every": 0, "sample_every": 0,
            "sample_steps": 1, "keep_states": 1, "average_checkpoints": 1, "keep_tokens": 0, "clip_skip": 1,
            "val_timesteps": 1}


def check_values(cfg: TrainConfig, method: type[TrainingMethod] | None = None) -> TrainConfig:
    """Range and consistency checks that need no files. Raises a one-line SdtuneError. `method`: the method
    class (default: the registered `cfg.method`)."""
    from sdtune.training.schedules import LRSchedule, parse_early_stop

    for f in cfg.fields():
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise SdtuneError(f"{f.name} {value!r} is not one of {', '.join(choices)}")
    auto = cfg.steps == "auto"
    if not auto:
        _at_least("steps", cfg.total_steps, 1)
    for name, low in MINIMUMS.items():
        _at_least(name, getattr(cfg, name), low)
    if cfg.val_timesteps > 900:
        raise SdtuneError(f"val_timesteps {cfg.val_timesteps} is too many; use 1..900 (8 is typical)")
    if not 0 <= cfg.seed < 2**63:
        raise SdtuneError(f"seed {cfg.seed} is out of range; use 0 .. 2**63-1")
    for name in ("max_grad_norm", "weight_decay", "noise_offset", "min_snr_gamma", "sample_cfg"):
        _finite_at_least(name, getattr(cfg, name), 0.0)
    for name in ("flip", "tag_dropout", "caption_dropout"):
        value = getattr(cfg, name)
        _finite_at_least(name, value, 0.0)
        if value > 1:
            raise SdtuneError(f"{name} {value} is a probability; use a value between 0 and 1")
    if cfg.optimizer in ("adamw8bit", "prodigy"):
        from sdtune.training.optimizers import check_optimizer

        check_optimizer(cfg.optimizer)
    _finite_at_least("zoom", cfg.zoom, 1.0)
    if cfg.zoom > 1 and cfg.crop != "random":
        raise SdtuneError(f"zoom {cfg.zoom} needs crop = random (a centre crop has no random scale)")
    if not (math.isfinite(cfg.val_split) and 0 <= cfg.val_split < 1):
        raise SdtuneError(f"val_split {cfg.val_split} must be a fraction in [0, 1), e.g. 0.1")
    if cfg.val_split > 0 and cfg.val_dir:
        raise SdtuneError("val_split and val_dir both given; hold images out with one of them")
    if cfg.resolution is not None and (cfg.resolution < 8 or cfg.resolution % 8):
        raise SdtuneError(f"resolution {cfg.resolution} must be a multiple of 8 and at least 8 (512 SD1, "
                          "768 SD2-v, 1024 SDXL, 64 tiny)")
    # steps auto: the schedule is checked on a placeholder length (the real one comes from the CV report)
    steps = max(1000, cfg.warmup_steps + 1) if auto else cfg.total_steps
    sched = LRSchedule.from_config(cfg.lr, cfg.lr_scheduler, cfg.warmup_steps, steps)
    if sched.peak <= 0:
        raise SdtuneError(f"learning rate {cfg.lr!r} is 0 everywhere; nothing would be learned")
    if cfg.warmup_steps and not auto and cfg.warmup_steps >= steps:
        raise SdtuneError(f"warmup_steps {cfg.warmup_steps} must be less than steps {cfg.steps}")
    if cfg.warmup_steps and cfg.lr_scheduler == "constant":
        raise SdtuneError("warmup_steps needs lr_scheduler constant_with_warmup, linear or cosine")
    parse_early_stop(cfg.early_stop)
    check_cv(cfg, auto)
    if cfg.early_stop and parse_early_stop(cfg.early_stop) and cfg.save_every == 0:
        raise SdtuneError("early_stop needs save_every > 0 (checkpoints are evaluated when they are saved)")
    select_metric, _ = parse_select_by(cfg.select_by)
    check_judge(cfg, select_metric)
    if cfg.sample_every and not cfg.sample_prompts:
        raise SdtuneError("sample_every is set but there are no sample prompts; add --sample-prompt TEXT")
    if cfg.sample_prompts and not cfg.sample_seeds:
        raise SdtuneError("sample prompts need at least one seed; add --sample-seed N")
    if any(s < 0 for s in cfg.sample_seeds):
        raise SdtuneError("sample seeds must be >= 0")
    from sdtune.prompts.tokens import check_text

    for i, text in enumerate(cfg.sample_prompts):  # refused now, not at the first sample after minutes
        check_text(text, f"sample prompt {i + 1}")
    if cfg.sample_negative:
        check_text(cfg.sample_negative, "sample_negative")
    if cfg.output_name is not None:
        check_output_name(cfg.output_name)
    if cfg.sample_sampler:
        from sdtune.generate.samplers import get_sampler

        try:
            get_sampler(cfg.sample_sampler)
        except SdtuneError as exc:
            raise SdtuneError(f"sample_sampler: {exc}") from None
    from sdtune.training.methods import get_method

    cls = method or get_method(cfg.method)
    cls.check_options(cfg.options if isinstance(cfg.options, getattr(cls, "Options", NoOptions))
                      else cls.Options(), cfg)
    return cfg

def check_output_name(name: str, what: str = "output_name") -> None:
    """Refuse a result name that is not one plain file name in the run folder, or that is one of the run
    folder's own entries (`RUN_ENTRIES`, any case: a result folder or file there would collide)."""
    if not isinstance(name, str) or any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise SdtuneError(f"{what} {name!a} contains control characters or invalid UTF-8; use a plain file "
                          "name such as my_lora")
    if not name.strip() or re.search(r"[\\/:*?\"<>|]", name):
        raise SdtuneError(f"{what} {name!r} must be a plain file name without / \\ : * ? \" < > |")
    if not name.strip(". "):
        raise SdtuneError(f"{what} {name!r} is not a file name (only dots); use a name such as my_lora")
    if name.lower() in RUN_ENTRIES:
        raise SdtuneError(f"{what} {name!r}: that name is taken by the run folder's own entries "
                          f"({', '.join(RUN_ENTRIES)}); choose another name")

def check_cv(cfg: TrainConfig, auto: bool) -> None:
    """Cross-validation (`cv_folds`) and `steps auto`: the combinations that cannot mean what they say."""
    k = cfg.cv_folds
    if k < 0 or k == 1:
        raise SdtuneError(f"cv_folds {k}: use 2 or more (5 is typical, at most the number of images), or 0 for "
                          "no cross-validation")
    if k and (cfg.val_split > 0 or cfg.val_dir):
        raise SdtuneError("cv_folds holds out its own validation images (one fold per run); drop --val-split / "
                          "--val-dir")
    if k and auto:
        raise SdtuneError("steps auto comes after cross-validation: run --cv-folds K with --steps N (the longest "
                          "run to evaluate) first, then --steps auto without --cv-folds")
    if k and cfg.early_stop:
        raise SdtuneError("cv_folds needs every fold's whole curve to average; drop --early-stop")
    if k and not (0 < cfg.save_every < cfg.total_steps):
        raise SdtuneError(f"cv_folds compares checkpoints: set --save-every below --steps {cfg.total_steps} "
                          f"(e.g. {max(1, cfg.total_steps // 10)}), got {cfg.save_every}")
    if cfg.cv_fold is not None and not 0 <= cfg.cv_fold < max(k, 1):
        raise SdtuneError(f"cv_fold {cfg.cv_fold} must be in 0..{k - 1} (cv_folds {k})")
    if auto and (cfg.val_split > 0 or cfg.val_dir):
        raise SdtuneError("steps auto trains on all images to the cross-validated step; drop --val-split / "
                          "--val-dir")

def check_judge(cfg: TrainConfig, select_metric: str) -> None:
    if cfg.judge is None:
        if select_metric == "judge_score":
            raise SdtuneError("select_by judge_score needs the toy-world judge; add --judge SHAPE (e.g. star)")
        return
    if not is_bundled_model(cfg.model) and not cfg.judge_any_model:
        raise SdtuneError(f"judge {cfg.judge!r} reads toy-world images only, and model {cfg.model!r} is not "
                          "tiny; add --judge-any-model if it was trained on the toy world")
    _at_least("judge_seeds", cfg.judge_seeds, 1)  # the shape and term: `sdtune.toy.concept_eval`

def check_paths(cfg: TrainConfig, *, model: bool = True, data: bool = True) -> TrainConfig:
    """Files and folders: model/vae/data/val_dir exist, the output folder is (or can be) a writable folder."""
    if model and not is_bundled_model(cfg.model):
        if not Path(cfg.model).expanduser().exists():
            raise SdtuneError(f"model {cfg.model!r} not found; pass a diffusers folder, a .safetensors/.ckpt "
                              "file, or tiny")
        check_readable(cfg.model, f"model {cfg.model}")
    if cfg.vae is not None and not Path(cfg.vae).expanduser().exists():
        raise SdtuneError(f"vae {cfg.vae!r} not found; pass a VAE folder or file")
    if cfg.vae is not None:
        check_readable(cfg.vae, f"vae {cfg.vae}")
    if data:
        if not cfg.data:
            raise SdtuneError("no training data; pass --data DIR (a folder of images with .txt captions)")
        for name in ("data", "val_dir"):
            value = getattr(cfg, name)
            if value is None:
                continue
            p = Path(value).expanduser()
            if not p.is_dir():
                what = "does not exist" if not p.exists() else "is a file, not a folder"
                raise SdtuneError(f"{name} folder {p} {what}; pass the folder that holds the images")
            check_readable(p, f"{name} folder {p}")
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"output folder {out} is a file; pass a folder with --out")
    check_writable_dir(out, "output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise SdtuneError(f"output folder {out} is not writable ({exc.strerror or exc}); choose another --out") \
            from None
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).expanduser().exists():
        raise SdtuneError(f"resume state {cfg.resume} does not exist; pass --resume alone to continue from "
                          f"{out / 'state'}")
    if cfg.resume not in (None, "auto"):
        check_readable(cfg.resume, f"resume state {cfg.resume}")
    return cfg


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise SdtuneError(f"{name} {value} must be at least {low}")


def _finite_at_least(name: str, value: float, low: float) -> None:
    if not math.isfinite(value) or value < low:
        raise SdtuneError(f"{name} {value} must be a finite number >= {low:g}")


def parse_select_by(text: str) -> tuple[str, str]:
    """"val_loss" -> ("val_loss", "min"); "clip:max" -> ("clip", "max"). Default min for names with 'loss'."""
    name, sep, mode = str(text).strip().partition(":")
    name = name.strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name):
        raise SdtuneError(f"select_by {text!r}: use a metric name such as val_loss, optionally with :min or :max")
    mode = mode.strip().lower() if sep else ("min" if "loss" in name.lower() else "max")
    if mode not in ("min", "max"):
        raise SdtuneError(f"select_by {text!r}: the direction must be :min or :max")
    return name, mode
