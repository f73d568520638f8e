"""The negative "wrong" LoRA as one resumable command: `sdtune recipe wrong-lora`.

The recipe (Max Woolf, "I made Stable Diffusion XL smarter by finetuning it on bad AI-generated images", 2023): let
the base model make deliberately bad images (its own failure modes, asked for with degradation words weighted up),
train a LoRA on them under a trigger word, `wrong`, and use it with `wrong` in the negative prompt. Guidance then
subtracts a prediction that knows exactly what this model's bad images look like. No trainer automates it.

Stages, each resumable (rerun the same command after an interruption; finished stages are skipped):
  1. OUT/bad_images/NNNN.png + .txt   image i: `{subject}, (term:W), ...` (seed + i; terms drawn with the seed),
                                      captioned `{subject}, wrong`; files written atomically, missing ones made
  2. OUT/train/                       an ordinary LoRA run (`train(...)`, resumed with resume="auto")
  3. OUT/wrong.safetensors            the kohya LoRA, copied atomically once the run finished
  4. OUT/compare/                     held-out subjects x seeds, one row per way of using it (base; `wrong` as the
                                      negative word alone; A1111's way: `<lora:wrong:0.5>` + negative `wrong`; sdtune's
                                      `--negative-lora` + negative `wrong`; the usual negative: the bad terms), a
                                      labelled grid and report.json with the evaluator's figures (the toy judge on
                                      the bundled model)

The core knows no judge: the caller passes `evaluate(images, prompts) -> {metric: value}` (the CLI gives the toy
judge for the bundled model), as `train(..., evaluator=)` does.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sdtune.atomic import atomic_path, write_atomic
from sdtune.errors import SdtuneError

# subjects for a real model (the toy world brings its own: `sdtune.toy.recipes`)
GENERIC_SUBJECTS = (
    "a portrait photo of a woman", "a portrait photo of an old man", "a photo of a dog in a park",
    "a photo of a cat on a sofa", "a city street at night", "a mountain landscape at sunrise",
    "a bowl of fruit on a table", "a red sports car", "a castle on a hill", "a living room interior",
    "a bouquet of flowers", "a lighthouse by the sea", "a plate of pasta", "a child playing football",
    "a forest path in autumn", "a cup of coffee", "a horse in a field", "a wooden cabin in the snow",
    "a robot in a workshop", "a beach with palm trees",
)
GENERIC_HELD_OUT = ("a photo of a fox in the woods", "a bridge over a river", "a portrait photo of a young man",
                    "a vase on a windowsill")
GENERIC_BAD_TERMS = ("blurry", "low quality", "bad anatomy", "jpeg artifacts", "deformed", "noisy",
                     "bad composition", "washed out colors")
VARIANTS = ("base", "negative word", "A1111 way", "negative LoRA", "negative terms")
COMPARE_ONLY = ("out", "held_out", "compare_seeds", "compare_steps", "compare_cfg", "lora_weight")
_TRIGGER = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")

Evaluate = Callable[[list[Any], list[str]], dict[str, float]]
Echo = Callable[[str], None]


@dataclass
class WrongLoraSettings:
    """Everything the recipe needs; `train` holds `TrainConfig`/LoRA option overrides (steps, lr, rank, ...)."""

    out: str
    model: str = "tiny"
    subjects: list[str] = field(default_factory=lambda: list(GENERIC_SUBJECTS))
    held_out: list[str] = field(default_factory=lambda: list(GENERIC_HELD_OUT))
    bad_terms: list[str] = field(default_factory=lambda: list(GENERIC_BAD_TERMS))
    images: int = 60
    terms_per_image: int = 2
    bad_weight: float = 1.4
    trigger: str = "wrong"
    seed: int = 0
    sampling_steps: int = 20        # of the bad images and of the comparison
    cfg: float = 7.0
    sampler: str | None = None
    compare_seeds: int = 4
    compare_steps: int | None = None    # default: sampling_steps
    compare_cfg: float | None = None    # default: cfg
    # weight of the LoRA in the comparison's A1111 and negative-LoRA rows, and in the usage printed: at 1 the toy
    # model's images got worse in 3 of 4 comparisons, at 0.5 more of them showed what was asked (docs/recipes.md)
    lora_weight: float = 0.5
    train: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "WrongLoraSettings":
        if not _TRIGGER.match(self.trigger):
            raise SdtuneError(f"--trigger {self.trigger!r} must be one word of letters, digits and _ (e.g. wrong)")
        for name, value, low, high in (("--images", self.images, 1, 5000), ("--terms-per-image",
                                        self.terms_per_image, 1, 8), ("--compare-seeds", self.compare_seeds, 1, 64),
                                       ("--sampling-steps", self.sampling_steps, 1, 1000),
                                       ("--compare-steps", self.compare_steps or 1, 1, 1000)):
            if not low <= value <= high:
                raise SdtuneError(f"{name} {value} is out of range; use {low}..{high}")
        if not 0.0 < self.lora_weight <= 2.0:  # also refuses NaN
            raise SdtuneError(f"--lora-weight {self.lora_weight} is out of range; use 0 < weight <= 2 (0.5 measured "
                              "best on the tiny model)")
        if not 0.1 <= self.bad_weight <= 3.0:
            raise SdtuneError(f"--bad-weight {self.bad_weight} is out of range; use 0.1..3 (1.4 = A1111's ((term)))")
        for name, cfg in (("--cfg", self.cfg), ("--compare-cfg", self.compare_cfg or self.cfg)):
            if not (1.0 < cfg <= 30.0):
                raise SdtuneError(f"{name} {cfg} is out of range: the recipe needs guidance; use 1 < cfg <= 30")
        for name, items in (("subjects", self.subjects), ("held-out subjects", self.held_out),
                            ("bad terms", self.bad_terms)):
            if not items or any(not str(s).strip() for s in items):
                raise SdtuneError(f"the {name} are empty; give at least one non-empty line")
            if len(items) > 10000:
                raise SdtuneError(f"{len(items)} {name} is too many; use at most 10000")
        if self.sampler:
            from sdtune.generate.samplers import check_sampler

            check_sampler(self.sampler)
        train_config(self, Path("bad_images"), Path("train")).check_values()  # the LoRA run's settings, before
        return self                                                              # any image is made


@dataclass
class WrongLoraResult:
    out: Path
    lora: Path
    images: int
    report: dict[str, Any]


def bad_prompts(s: WrongLoraSettings) -> list[tuple[str, str, int]]:
    """(prompt, caption, seed) of every bad image: deterministic in the settings, so a resumed run makes the
    same images. The terms are weighted up with A1111's syntax, `(blurry:1.4)`."""
    rng = random.Random(s.seed)
    k = min(s.terms_per_image, len(s.bad_terms))
    out = []
    for i in range(s.images):
        subject = s.subjects[i % len(s.subjects)]
        terms = rng.sample(list(s.bad_terms), k)
        prompt = subject + ", " + ", ".join(f"({t}:{s.bad_weight:g})" for t in terms)
        out.append((prompt, f"{subject}, {s.trigger}", s.seed + i))
    return out


def _params(s: WrongLoraSettings, *, compare: bool = False, **kwargs: Any) -> Any:
    from sdtune.generate import GenerationParams

    steps, cfg = (s.compare_steps or s.sampling_steps, s.compare_cfg or s.cfg) if compare else (s.sampling_steps, s.cfg)
    params = GenerationParams(steps=steps, cfg_scale=cfg, **kwargs)
    return params.replace(sampler=s.sampler) if s.sampler else params


def make_bad_images(generator: Any, s: WrongLoraSettings, folder: Path, echo: Echo,
                    stop: Callable[[], bool] | None = None) -> int:
    """Stage 1: the images that are missing (a resumed run makes only those)."""
    from sdtune.generate.pnginfo import png_info

    folder.mkdir(parents=True, exist_ok=True)
    todo = [(i, p) for i, p in enumerate(bad_prompts(s)) if not (folder / f"{i:04d}.png").is_file()]
    if todo:
        echo(f"generating {len(todo)} bad images with the base model -> {folder}")
    for i, (prompt, caption, seed) in todo:
        if stop is not None and stop():
            raise SdtuneError("the recipe was stopped while making the bad images; rerun it to continue")
        image = generator.generate(_params(s, prompt=prompt, seed=seed))[0]
        write_atomic(folder / f"{i:04d}.txt", caption + "\n")  # the caption first: an image is never uncaptioned
        with atomic_path(folder / f"{i:04d}.png") as tmp:
            image.image.save(tmp, format="PNG", pnginfo=png_info(image.infotext))
    return s.images


def train_config(s: WrongLoraSettings, data: Path, run: Path) -> Any:
    """The LoRA run of stage 2: the LoRA trainer's own defaults, prior preservation off (as the recipe does),
    the recipe's overrides, and the user's."""
    from sdtune.training.config import TrainConfig

    values: dict[str, Any] = {"model": s.model, "data": str(data), "out": str(run), "output_name": s.trigger,
                              "resume": "auto", "seed": s.seed, **DEFAULT_TRAINING,
                              **{k: v for k, v in s.train.items() if k in TRAIN_FIELDS}}
    options = {**DEFAULT_LORA, **{k: v for k, v in s.train.items() if k not in TRAIN_FIELDS}}
    return TrainConfig(method="lora").merged(values, source="recipe wrong-lora", method_options=options)


# the recipe's defaults (measured on the toy world: docs/recipes.md); flags override them
DEFAULT_TRAINING: dict[str, Any] = {"steps": 600, "lr": 1e-3, "batch_size": 4, "save_every": 0}
DEFAULT_LORA: dict[str, Any] = {"rank": 8, "alpha": 8.0, "text_encoder": True, "prior_preservation": False}
TRAIN_FIELDS = ("steps", "lr", "batch_size", "save_every", "mixed_precision", "gradient_checkpointing", "device",
                "flip", "caption_dropout", "lr_scheduler", "warmup_steps")


def train_wrong_lora(s: WrongLoraSettings, data: Path, out: Path, echo: Echo,
                     stop: Callable[[], bool] | None = None) -> Path:
    """Stages 2 and 3: train (or resume) the LoRA; OUT/<trigger>.safetensors once the run finished."""
    from sdtune.training.loop import train

    final = out / f"{s.trigger}.safetensors"
    if final.is_file():
        return final
    cfg = train_config(s, data, out / "train")
    cfg.check_values()
    echo(f"training the '{s.trigger}' LoRA on {s.images} images -> {out / 'train'}")
    result = train(cfg, on_step=None if stop is None else
                   lambda trainer, step, loss: trainer.request_stop("interrupted") if stop() else None)
    if result.stopped not in ("finished", "early_stop") or result.final is None:
        raise SdtuneError(f"the LoRA run stopped ({result.stopped}) before it finished; rerun the same command "
                          "to resume it")
    with atomic_path(final) as tmp:
        shutil.copyfile(result.final, tmp)
    return final


def _variants(s: WrongLoraSettings, lora: Path) -> list[tuple[str, str, str, list]]:
    """(name, prompt suffix, negative prompt, negative loras) per comparison row."""
    w = s.lora_weight
    return [("base", "", "", []),
            ("negative word", "", s.trigger, []),
            ("A1111 way", f" <lora:{lora.stem}:{w:g}>", s.trigger, []),
            ("negative LoRA", "", s.trigger, [(lora, w)]),
            ("negative terms", "", ", ".join(s.bad_terms), [])]


def compare(generator: Any, s: WrongLoraSettings, lora: Path, folder: Path, evaluate: Evaluate | None,
            echo: Echo) -> dict[str, Any]:
    """Stage 4: every variant on the held-out subjects at fixed seeds; labelled grid + report.json."""
    rows: dict[str, list[Any]] = {}
    report: dict[str, Any] = {"held_out": list(s.held_out), "seeds": s.compare_seeds,
                              "steps": s.compare_steps or s.sampling_steps, "cfg": s.compare_cfg or s.cfg,
                              "sampler": s.sampler, "lora_weight": s.lora_weight, "variants": {}}
    dirs = list(generator.loras.dirs)
    generator.loras.dirs[:] = [lora.parent]  # where the A1111 row's <lora:...> tag is found
    generator.set_loras([])
    for name, suffix, negative, negative_loras in _variants(s, lora):
        echo(f"comparison: {name}")
        generator.set_negative_loras(negative_loras)
        images, prompts = [], []
        for subject in s.held_out:
            made = generator.generate(_params(s, compare=True, prompt=subject + suffix, negative_prompt=negative,
                                              seed=1000, batch_size=s.compare_seeds))
            images += [m.image for m in made]
            prompts += [subject] * len(made)
        rows[name] = images
        entry: dict[str, Any] = {"prompt_suffix": suffix, "negative_prompt": negative,
                                 "negative_loras": [str(p) for p, _ in negative_loras]}
        if evaluate is not None:
            entry["figures"] = evaluate(images, prompts)
        report["variants"][name] = entry
    generator.set_negative_loras([])
    generator.loras.dirs[:] = dirs
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "grid.png") as tmp:
        labelled_grid(rows).save(tmp, format="PNG")
    write_atomic(folder / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def labelled_grid(rows: dict[str, list[Any]], label_width: int = 120) -> Any:
    """One row per variant, its name at the left."""
    from PIL import Image, ImageDraw

    cells = [im for images in rows.values() for im in images]
    w, h = max(im.width for im in cells), max(im.height for im in cells)
    cols = max(len(images) for images in rows.values())
    sheet = Image.new("RGB", (label_width + cols * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, r * h + h // 2 - 6), name, fill="black")
        for c, im in enumerate(images):
            sheet.paste(im.convert("RGB"), (label_width + c * w, r * h))
    return sheet


def usage(lora: Path, trigger: str, weight: float) -> str:
    spec = shlex.quote(f"{lora}:{weight:g}")
    return (f"use it: sdtune generate \"PROMPT\" --lora {spec} --negative {trigger}   (A1111: put "
            f"<lora:{lora.stem}:{weight:g}> in the prompt and {trigger} in the negative prompt; the LoRA acts on both "
            f"passes)\n   or on the negative pass only: sdtune generate \"PROMPT\" --negative-lora {spec} "
            f"--negative {trigger}\n   compare the rows of {lora.parent / 'compare'} for this model first")


def run_wrong_lora(s: WrongLoraSettings, *, evaluate: Evaluate | None = None, echo: Echo = print,
                   generator: Any = None, stop: Callable[[], bool] | None = None) -> WrongLoraResult:
    """All four stages (finished ones skipped). `generator`: a loaded `Generator` of `s.model` to reuse; `stop`:
    polled between images and training steps (the server's Stop), ending with a resumable state."""
    s.validate()
    from sdtune.paths import check_writable_dir

    out = Path(s.out).expanduser()
    if out.is_file():
        raise SdtuneError(f"--out {out} is a file; give a folder for the recipe's images, run and results")
    check_writable_dir(out, f"--out {out}")
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "recipe.json"
    # what the images and the LoRA depend on; the comparison's settings may change between runs (it is redone)
    mine = {k: v for k, v in asdict(s).items() if k not in COMPARE_ONLY}
    if settings_file.is_file():
        try:
            saved = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise SdtuneError(f"{settings_file} is unreadable; remove it or choose another --out") from None
        if saved != json.loads(json.dumps(mine)):
            changed = sorted(k for k in mine if saved.get(k) != json.loads(json.dumps(mine[k])))
            raise SdtuneError(f"{out} holds a wrong-lora run made with other settings ({', '.join(changed)}); rerun "
                              "with the same settings to resume it (--compare-* may change), or choose another --out")
    else:
        other = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if other:  # e.g. a training run's folder: the recipe's stages would mix their files with it
            raise SdtuneError(f"{out} is not empty ({', '.join(other[:5])}) and holds no wrong-lora recipe "
                              "(recipe.json); choose a new or empty --out")
        write_atomic(settings_file, json.dumps(mine, indent=2) + "\n")
    if generator is None:
        from sdtune.generate import Generator

        generator = Generator(s.model)
    n = make_bad_images(generator, s, out / "bad_images", echo, stop)
    lora = train_wrong_lora(s, out / "bad_images", out, echo, stop)
    report = compare(generator, s, lora, out / "compare", evaluate, echo)
    echo(f"wrote {lora}\n{usage(lora, s.trigger, s.lora_weight)}")
    return WrongLoraResult(out=out, lora=lora, images=n, report=report)


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (subjects, bad terms), bounded."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SdtuneError(f"{what} file {p}: no such file")
    if p.stat().st_size > 1_000_000:
        raise SdtuneError(f"{what} file {p} is larger than 1 MB; give one {what[:-1]} per line")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise SdtuneError(f"{what} file {p} is not UTF-8 text; save it as UTF-8") from None
    return [line for line in lines if line and not line.startswith("#")]


def parse_terms(text: str | Sequence[str]) -> list[str]:
    """`--bad-terms "blurry, low quality"` (or repeated) -> ["blurry", "low quality"]."""
    parts = [text] if isinstance(text, str) else list(text)
    return [t.strip() for p in parts for t in p.split(",") if t.strip()]
