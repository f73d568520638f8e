"""`TrainConfig`: the one schema of a training run, shared by the Python API, TOML files and the CLI.

Every setting is a dataclass field whose metadata carries its section, help text, kind and choices. The CLI builds
its options from that metadata (`sdtune.cli.config_options`), TOML files are read into it (`from_toml`) and the effective
config of a run is written back as `config.toml` and `config.json` (`write`), so `sdtune train --config
out/config.toml` repeats a run exactly. A method's own settings (LoRA rank, ...) live in the method's `Options`
dataclass, declared with the same `opt()` helper, in a TOML table named after the method:

    method = "lora"
    [model]
    model = "tiny"
    [data]
    data = "data/heart"
    [optim]
    steps = 200
    lr = "1e-3:100, 1e-4"
    [lora]
    rank = 8

Keys may also be given flat (without the section tables). Precedence: defaults < saved run (on resume) <
`--config` file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from sdtune.atomic import write_atomic
from sdtune.paths import check_readable
from sdtune.errors import SdtuneError
from sdtune.training.config_checks import check_output_name, check_paths, check_values
from sdtune.training.options import KINDS, SECTIONS, NoOptions, coerce, merge_options, opt, unknown_setting

# entries the loop writes into a run folder; a result named like one would collide with it (a folder result such
# as DreamBooth's diffusers output is OUT/<name>/)

if TYPE_CHECKING:
    from sdtune.training.methods.base import TrainingMethod

@dataclass
class TrainConfig:
    """Everything a training run needs. See each field's help (or `sdtune train METHOD --help`)."""

    method: str = opt("lora", "Training method.", section="", kind="str", cli=False)
    # -- model
    model: str = opt("tiny", "Base model: a diffusers folder, a .safetensors/.ckpt checkpoint, or tiny.",
                     section="model", kind="path", metavar="PATH")
    vae: str | None = opt(None, "Use this VAE instead of the model's (folder or single file).",
                          section="model", kind="path", metavar="PATH")
    prediction_type: str | None = opt(None, "Override the model's prediction type (SD2 checkpoints that cannot "
                                      "tell).", section="model", kind="str", choices=("epsilon", "v_prediction"))
    device: str = opt("auto", "Device: auto, cpu, cuda, cuda:N or mps.", section="model", kind="str")
    mixed_precision: str = opt("no", "Mixed precision: no (fp32), fp16 (CUDA) or bf16. Trained weights stay fp32.",
                               section="model", kind="str", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, slower).",
                                       section="model", kind="bool")
    channels_last: bool = opt(False, "UNet weights in channels-last layout: faster convolutions on tensor-core GPUs, "
                              "the same results; no gain on CPUs.", section="model", kind="bool")
    compile: bool = opt(False, "torch.compile the UNet: faster steps on GPUs after a first step that compiles "
                        "(minutes); not worth it for short runs.", section="model", kind="bool")
    clip_skip: int = opt(1, "CLIP layer to condition on, A1111 numbering (1 = last, 2 = the one before; SDXL "
                         "always uses its own convention).", section="model", kind="int")
    # -- data
    data: str | None = opt(None, "Training images folder (plain, or kohya <repeats>_<name> subfolders).",
                           section="data", kind="path", metavar="DIR")
    resolution: int | None = opt(None, "Training size in pixels (default: the model's native size).",
                                 section="data", kind="int")
    buckets: bool = opt(False, "Train each image at the aspect-ratio bucket nearest its own shape instead of a "
                        "centre-cropped square.", section="data", kind="bool")
    val_split: float = opt(0.0, "Fraction of the images held out for validation (0 = none).", section="data",
                           kind="float")
    val_dir: str | None = opt(None, "Folder of validation images (instead of --val-split).", section="data",
                              kind="path", metavar="DIR")
    skip_bad: bool = opt(False, "Skip unreadable images with a warning instead of stopping.", section="data",
                         kind="bool")
    latents: str = opt("auto", "Latents to train on: a fresh sample of the VAE posterior each step, or its "
                       "mean; auto = what the model was trained on (mean for the bundled tiny model, as its "
                       "sdtune.json says; sample otherwise).", section="data", kind="str",
                       choices=("auto", "sample", "mean"))
    latent_cache: str = opt("memory", "Where the cached latents live: memory (fastest), or disk (OUT/latent_cache, "
                            "reused by reruns: datasets too large for RAM, at a file read per image per step).",
                            section="data", kind="str", choices=("memory", "disk"))
    # -- augmentation
    flip: float = opt(0.0, "Chance of a horizontal flip (mirrors text and asymmetric features).",
                      section="augment", kind="float")
    crop: str = opt("center", "Crop: center (latents cached once) or random (encoded every step).",
                    section="augment", kind="str", choices=("center", "random"))
    zoom: float = opt(1.0, "With random crop: enlarge by a random factor up to this before cropping (>= 1).",
                      section="augment", kind="float")
    shuffle_tags: bool = opt(False, "Shuffle comma-separated caption tags.", section="augment", kind="bool")
    keep_tokens: int = opt(0, "Tags at the start of the caption kept in place by shuffle and tag dropout.",
                           section="augment", kind="int")
    tag_dropout: float = opt(0.0, "Chance of dropping each (not kept) tag.", section="augment", kind="float")
    caption_dropout: float = opt(0.0, "Chance the whole caption becomes empty (unconditional training).",
                                 section="augment", kind="float")
    # -- optimisation
    steps: int | str = opt(1000, "Optimizer steps to train, or auto: the step count cross-validated by an earlier "
                           "--cv-folds run into the same --out (OUT/cv/report.json), trained on all images.",
                           section="optim", kind="steps", metavar="N|auto")
    lr: float | str = opt(1e-4, "Learning rate, or A1111's schedule '0.005:100, 1e-3:1000, 1e-5'.",
                          section="optim", kind="lr", metavar="RATE")
    lr_scheduler: str = opt("constant", "Shape of the rate over the run.", section="optim", kind="str",
                            choices=("constant", "constant_with_warmup", "linear", "cosine"))
    warmup_steps: int = opt(0, "Linear warm-up steps.", section="optim", kind="int")
    optimizer: str = opt("adamw", "Optimizer: adamw, adamw_fused (the same maths in one fused kernel per step: "
                         "faster on GPUs), sgd, adamw8bit (needs bitsandbytes; a quarter of AdamW's state memory, "
                         "noisier steps), prodigy (needs prodigyopt; use --lr 1).", section="optim", kind="str",
                         choices=("adamw", "adamw_fused", "sgd", "adamw8bit", "prodigy"))
    batch_size: int = opt(1, "Images per batch, per process (several processes: the global batch is this x "
                          "processes; docs/multi_gpu.md).", section="optim", kind="int")
    grad_accum: int = opt(1, "Batches accumulated per optimizer step.", section="optim", kind="int")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 = off).", section="optim", kind="float")
    weight_decay: float = opt(0.01, "AdamW weight decay.", section="optim", kind="float")
    noise_offset: float = opt(0.0, "Noise offset (adds a per-channel constant to the noise; 0 = off).",
                              section="optim", kind="float")
    min_snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (5 is typical; 0 = off).", section="optim",
                               kind="float")
    seed: int = opt(0, "Seed for data order, augmentations, noise and timesteps.", section="optim", kind="int")
    # -- output
    out: str | None = opt(None, "Output folder (checkpoints, samples, logs, state).", section="output",
                          kind="path", metavar="DIR")
    output_name: str | None = opt(None, "File name of the result without extension (default: the method name).",
                                  section="output", kind="str")
    save_every: int = opt(250, "Save (and evaluate) a checkpoint every N steps (0 = only at the end).",
                          section="output", kind="int")
    keep_checkpoints: str = opt("best", "Checkpoint files to keep: all, best, or last.", section="output",
                                kind="str", choices=("all", "best", "last"))
    average_checkpoints: int = opt(1, "Each checkpoint file holds the mean of the weights at its step and the N-1 "
                                   "checkpoints before it (training goes on from the raw weights; evaluation and "
                                   "the final file use the mean). Smooths run-to-run variance; costs N-1 copies of "
                                   "the trained weights in memory (e.g. 3 with --save-every 500).", section="output",
                                   kind="int", metavar="N")
    keep_states: int = opt(1, "Resumable training states kept in OUT/state.", section="output", kind="int")
    resume: str | None = opt(None, "Continue from OUT/state ('auto': if there is one) or from a state folder.",
                             section="output", kind="str", metavar="[auto|DIR]")
    # -- samples
    sample_every: int = opt(0, "Make a sample grid every N steps (0 = off).", section="samples", kind="int")
    sample_prompts: list[str] = opt([], "Prompt for the sample grids (repeat the option for several).",
                                    section="samples", kind="strs", metavar="TEXT")
    sample_seeds: list[int] = opt([1], "Seeds for the sample grids (repeat or comma-separate).",
                                  section="samples", kind="ints", metavar="SEED")
    sample_negative: str = opt("", "Negative prompt for the samples.", section="samples", kind="str")
    sample_steps: int = opt(20, "Sampling steps for the samples.", section="samples", kind="int")
    sample_cfg: float = opt(7.0, "CFG scale for the samples.", section="samples", kind="float")
    sample_sampler: str | None = opt(None, "Sampler for the samples (A1111 name; default as `generate`).",
                                     section="samples", kind="str")
    # -- evaluation
    val_timesteps: int = opt(8, "Fixed timesteps per validation image, spread over [50, 950].", section="eval",
                             kind="int")
    cv_folds: int = opt(0, "Cross-validate the step count: K runs of --steps, each holding out one K-th of the images "
                        "(a seeded partition) for validation, in OUT/cv/fold-k; OUT/cv/report.json gets the mean and "
                        "spread of every checkpoint's metrics over the folds and the recommended step: the earliest "
                        "checkpoint within one standard error of the best mean (--select-by, val_loss by default). "
                        "Then --steps auto trains on all images to it. 0 = off; 2..images.",
                        section="eval", kind="int", metavar="K")
    cv_fold: int | None = opt(None, "The fold this run holds out (set by the cross-validation for its fold runs).",
                              section="eval", kind="int", cli=False)
    early_stop: str | None = opt(None, "Stop after 'patience[,min_delta]' evaluations without improvement.",
                                 section="eval", kind="str", metavar="P[,D]")
    select_by: str = opt("val_loss", "Metric that picks the best checkpoint: val_loss, or an evaluator metric; "
                         "append :min or :max (default min for *loss*, max otherwise).", section="eval", kind="str")
    judge: str | None = opt(None, "Toy world: judge every checkpoint's images of this shape (star, heart, ...) and "
                            "report fidelity, context and judge_score (select with --select-by judge_score).",
                            section="eval", kind="str", metavar="SHAPE")
    judge_term: str | None = opt(None, "The concept words in the judge's prompts, e.g. '<star>' or 'sks shape' "
                                 "(default: the ti token, or --prompt without its leading 'a photo of a').",
                                 section="eval", kind="str", metavar="TEXT")
    judge_seeds: int = opt(4, "Images per judge prompt (seeds 0..N-1).", section="eval", kind="int")
    judge_any_model: bool = opt(False, "Allow --judge with a model other than tiny (the judge reads only toy-world "
                                "images: for models trained on the toy world).", section="eval", kind="bool")
    # -- logging
    progress: bool = opt(True, "Show a progress bar.", section="log", kind="bool")
    tensorboard: bool = opt(True, "Write TensorBoard logs to OUT/tensorboard when tensorboard is installed.",
                            section="log", kind="bool")
    # -- the method's own settings (its Options dataclass), in a table named after the method
    options: Any = field(default=None, metadata={"section": "", "kind": "options", "cli": False})

    # ---------------------------------------------------------------------------------------------- building

    def __post_init__(self) -> None:
        if self.options is None:
            self.options = options_class(self.method)()

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("kind") in KINDS]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config", base: TrainConfig | None = None
                  ) -> TrainConfig:
        """A config from a flat or sectioned mapping (TOML/JSON layout), on top of `base` (or the defaults)."""
        flat, method_table, method = _flatten(data, source)
        cfg = base.replace() if base is not None else cls(method=method or "lora")
        if method and method != cfg.method:
            cfg = cfg.replace(method=method, options=options_class(method)())
        return cfg.merged(flat, source=source, method_options=method_table)

    @classmethod
    def from_toml(cls, path: str | Path, *, base: TrainConfig | None = None) -> TrainConfig:
        import tomllib

        p = check_readable(path, f"config file {path}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SdtuneError(f"config file {p} does not exist; check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SdtuneError(f"config file {p} is unreadable ({exc}); fix it") from None
        except tomllib.TOMLDecodeError as exc:
            raise SdtuneError(f"config file {p} is not valid TOML: {exc}") from None
        return cls.from_dict(data, source=str(p), base=base)

    @classmethod
    def from_json(cls, path: str | Path, *, base: TrainConfig | None = None) -> TrainConfig:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SdtuneError(f"config file {p} is unreadable ({exc}); fix it or start a new run") from None
        return cls.from_dict(data, source=str(p), base=base)

    def replace(self, **changes: Any) -> TrainConfig:
        new = dataclasses.replace(self, **changes)
        if "options" not in changes:
            new.options = dataclasses.replace(self.options)
        return new

    def merged(self, values: Mapping[str, Any], *, source: str = "options",
               method_options: Mapping[str, Any] | None = None) -> TrainConfig:
        """A copy with `values` (flat field names) and method options applied, each type-checked."""
        by_name = {f.name: f for f in self.fields()}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if key == "method":
                continue
            if key not in by_name:
                raise SdtuneError(unknown_setting(key, by_name, source))
            changes[key] = coerce(key, by_name[key].metadata, value, source, nullable=by_name[key].default is None)
        new = self.replace(**changes)
        if method_options:
            new.options = merge_options(new.options, method_options, source=f"{source} [{new.method}]")
        return new

    # ---------------------------------------------------------------------------------------------- writing

    def to_dict(self) -> dict[str, Any]:
        """Sectioned layout: {"method": ..., "model": {...}, ..., <method>: {...}}; None values kept (JSON null)."""
        out: dict[str, Any] = {"method": self.method}
        for sec in SECTIONS:
            out[sec] = {f.name: _plain(getattr(self, f.name)) for f in self.fields() if f.metadata["section"] == sec}
        out[self.method] = {f.name: _plain(getattr(self.options, f.name)) for f in dataclasses.fields(self.options)}
        return out

    def to_toml(self) -> str:
        """The config as TOML (tomli-w); unset settings are left out, which reads back as unset."""
        import tomli_w

        doc = {sec: ({k: v for k, v in values.items() if v is not None} if isinstance(values, dict) else values)
               for sec, values in self.to_dict().items()}
        return ("# sdtune training config: `sdtune train " + self.method + " --config THIS_FILE` repeats the run.\n"
                + tomli_w.dumps(doc))

    def write(self, folder: str | Path) -> None:
        """Write config.toml and config.json into `folder` atomically."""
        folder = Path(folder)
        write_atomic(folder / "config.toml", self.to_toml())
        write_atomic(folder / "config.json", json.dumps(self.to_dict(), indent=2) + "\n")

    # ---------------------------------------------------------------------------------------------- checking

    @property
    def name(self) -> str:
        return self.output_name or self.method

    @property
    def total_steps(self) -> int:
        """`steps` as a number; "auto" must have been resolved first (`training.folds.resolve_auto_steps`)."""
        if isinstance(self.steps, str):
            raise SdtuneError("steps auto is not resolved yet: it is read from OUT/cv/report.json; run with "
                              "--cv-folds K first")
        return self.steps

    @property
    def out_dir(self) -> Path:
        if not self.out:
            raise SdtuneError("no output folder; pass --out DIR")
        return Path(self.out).expanduser()

    def check_values(self, method: type[TrainingMethod] | None = None) -> TrainConfig:
        """Range and consistency checks that need no files (`training.config_checks`)."""
        return check_values(self, method)

    @staticmethod
    def check_output_name(name: str, what: str = "output_name") -> None:
        """A result name that is one plain file name in the run folder (`training.config_checks`)."""
        check_output_name(name, what)

    def check_paths(self, *, model: bool = True, data: bool = True) -> TrainConfig:
        """Files and folders exist and the output folder is writable (`training.config_checks`)."""
        return check_paths(self, model=model, data=data)

    def validate(self, *, model: bool = True, data: bool = True) -> TrainConfig:
        """Everything that can be checked before loading anything (values, then files and folders)."""
        return self.check_values().check_paths(model=model, data=data)


# ---------------------------------------------------------------------------------------------- helpers

def method_cls(name: str) -> type[TrainingMethod]:
    from sdtune.training.methods import get_method

    return get_method(name)


def options_class(method: str) -> type:
    from sdtune.training.methods import METHODS

    cls = METHODS.get(method)
    return getattr(cls, "Options", NoOptions) if cls is not None else NoOptions


def _flatten(data: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(flat field values, the method's table, method name) from a sectioned or flat mapping."""
    from sdtune.training.methods import METHODS

    method = data.get("method")
    if method is not None and (not isinstance(method, str) or method not in METHODS):
        raise SdtuneError(f"{source}: method {method!r} is unknown; use one of {', '.join(sorted(METHODS))}")
    field_sections = {f.name: f.metadata["section"] for f in TrainConfig.fields()}
    flat: dict[str, Any] = {}
    method_table: dict[str, Any] = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key in SECTIONS:
            if not isinstance(value, Mapping):
                raise SdtuneError(f"{source}: [{key}] must be a table of settings")
            for k, v in value.items():
                if k in field_sections and field_sections[k] != key:
                    raise SdtuneError(f"{source}: {k!r} belongs in [{field_sections[k]}], not [{key}]")
                flat[k] = v
        elif key in METHODS:
            if method is not None and key != method:
                continue  # another method's table: ignored, so one file can hold settings for several methods
            if not isinstance(value, Mapping):
                raise SdtuneError(f"{source}: [{key}] must be a table of settings")
            method_table.update(value)
        else:
            flat[key] = value
    return flat, method_table, method


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
