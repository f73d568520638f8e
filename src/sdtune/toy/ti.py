"""Textual Inversion on the toy world, measured with the judge: the acceptance run (`bench/accept_ti.py`) and the
demo's TI stage use this.

The world's star and diamond are shapes the base model learned under words its tokenizer no longer has
(`world.FORGOTTEN_WORDS`) and as "a {colour} shape", which draws either: it can draw them, no word asks for one.
An embedding `<star>` is trained from 5 rendered stars in five colour/background pairs (captions
"{colour} [name] on a {bg} background" with the base captions' prefixes as templates) and judged:

* shape fidelity: prompts without any context ("a photo of a <star>", "a picture of a <star>") and with the
  training context ("a red <star> on a white background"): the judge must read the target shape;
* context kept: new colours and backgrounds ("a blue <star> on a black background"): the judge must read that
  colour and that background (and, reported separately, the shape);
* the base model with the word "shape" in place of the token gives the comparison.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from sdtune.atomic import atomic_path
from sdtune.toy import world
from sdtune.toy.concept_eval import CONTEXT, ConceptJudge

# the concept datasets' colour/background pairs (image i: COLOURS[i % 5] on BACKGROUNDS[i % 3]): none of them is a
# pair the judge's new-context prompts ask for (concept_eval.CONTEXT); one colour only teaches "red star"
COLOURS = ("red", "blue", "green", "yellow", "purple")
BACKGROUNDS = ("white", "gray", "black")
TEMPLATES = ["a [filewords]", "a photo of a [filewords]", "a picture of a [filewords]", "a rendering of a [filewords]"]
FIDELITY = ["a photo of a {t}", "a picture of a {t}", "a red {t} on a white background"]


def write_concept_dataset(folder: str | Path, *, shape: str = "star", colours: tuple[str, ...] = COLOURS,
                          n: int = 5, backgrounds: tuple[str, ...] = BACKGROUNDS, seed: int = 0) -> Path:
    """n rendered images of one shape (position and size jittered; image i in colours[i % len] on
    backgrounds[i % len]) with captions that name colour and background and put [name] where the shape's word
    would be."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        bg, colour = backgrounds[i % len(backgrounds)], colours[i % len(colours)]
        scene = world.random_scene(rng, shapes=(shape,), colours=(colour,), backgrounds=(bg,))
        world.render(scene).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"{colour} [name] on a {bg} background\n", encoding="utf-8")
    return folder


def write_templates(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    return p


def concept_judge(token: str, shape: str, seeds: list[int], *, keep: int = 0) -> ConceptJudge:
    """The shared judge (`toy.concept_eval`) with this module's prompts (fidelity includes the training context)."""
    return ConceptJudge(shape=shape, term=token, seeds=seeds, fidelity=FIDELITY, context=CONTEXT, per_prompt=True,
                        keep=keep)


def _legacy(m: dict[str, Any]) -> dict[str, Any]:
    """concept_eval's names -> this module's (shape_fidelity, context_kept, context_shape, fidelity[...])."""
    out = {"shape_fidelity": m["fidelity"], "context_kept": m["context"], "context_shape": m["context_shape"]}
    out.update({k: v for k, v in m.items() if k.startswith("fidelity[") or k == "images"})
    return out


def judge_prompts(generate: Any, token: str, shape: str, seeds: list[int], *, keep: int = 0) -> dict[str, Any]:
    """Metrics of `generate(prompts, seeds) -> images` for the fidelity and context prompts with `token`."""
    return _legacy(concept_judge(token, shape, seeds, keep=keep).score(generate))


def generator_fn(gen: Any, steps: int = 20, cfg: float = 7.0) -> Any:
    from sdtune.generate import GenerationParams

    def generate(prompts: list[str], seeds: list[int]) -> list[Any]:
        out = []
        for p in prompts:
            out += [r.image for r in gen.generate(GenerationParams(prompt=p, seed=seeds[0], batch_size=len(seeds),
                                                                   steps=steps, cfg_scale=cfg))]
        return out
    return generate


def train_concept(model: Any, work: Path, *, token: str = "<star>", shape: str = "star", n_images: int = 5,
                  steps: int = 300, lr: Any = 5e-3, vectors: int = 2, init: str = "shape", save_every: int = 100,
                  seeds: int = 8, batch_size: int = 2, eval_steps: int = 20, echo: Any = None, seed: int = 0,
                  evaluate: bool = True, colours: tuple[str, ...] = COLOURS,
                  backgrounds: tuple[str, ...] = BACKGROUNDS,
                  evaluator_extra: Any = None) -> dict[str, Any]:
    """Render a dataset, train `token` on `model` (a LoadedModel, trained in place: only the vectors change),
    judging every saved step. Returns figures (per step) and the final file."""
    from sdtune.training import TrainConfig, train
    from sdtune.training.methods.textual_inversion import TIOptions

    work = Path(work)
    data = write_concept_dataset(work / "data", shape=shape, colours=colours, n=n_images, backgrounds=backgrounds,
                                 seed=seed)
    templates = write_templates(work / "templates.txt")
    seed_list = list(range(seeds))
    rows: list[dict[str, Any]] = []

    concept = concept_judge(token, shape, seed_list)

    def evaluator(ctx: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        m = {k: float(v) for k, v in _legacy(concept(ctx)).items() if not k.startswith("fidelity[")}
        rows.append({"step": ctx.step, **m, "eval_seconds": round(time.perf_counter() - t0, 1)})
        return m

    cfg = TrainConfig(method="ti", data=str(data), out=str(work / "run"), steps=steps, lr=lr, batch_size=batch_size,
                      save_every=save_every, progress=False, tensorboard=False, seed=seed, flip=0.5,
                      latents="mean",  # the tiny UNet was trained on posterior means; samples are off its data
                      sample_steps=eval_steps, keep_checkpoints="all",
                      select_by="shape_fidelity:max" if evaluate else "val_loss",
                      options=TIOptions(token=token, init=init, vectors=vectors, templates=str(templates)))
    times: list[float] = []
    t0 = time.perf_counter()
    result = train(cfg, model=model, evaluator=evaluator if evaluate else None,
                   on_step=lambda t, s, loss: times.append(time.perf_counter()), echo=echo or (lambda s: None))
    total = time.perf_counter() - t0
    eval_s = sum(r["eval_seconds"] for r in rows)
    return {"final": result.final, "best_step": result.best_step, "rows": rows, "seconds_total": round(total, 1),
            "seconds_training": round(total - eval_s, 1), "seconds_eval": round(eval_s, 1),
            "steps": steps, "losses": result.losses}


def side_by_side(rows: list[tuple[str, list[Any]]], captions: list[str] | None = None) -> Any:
    """A sheet with one labelled row of images per (label, images)."""
    from PIL import Image, ImageDraw

    cell = max(im.width for _, ims in rows for im in ims)
    label_w, head = 150, 14 if captions else 0
    cols = max(len(ims) for _, ims in rows)
    sheet = Image.new("RGB", (label_w + cols * cell, head + len(rows) * cell), (20, 20, 24))
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(captions or []):
        draw.text((label_w + c * cell + 2, 1), text[:14], fill=(220, 220, 220))
    for r, (label, ims) in enumerate(rows):
        draw.text((4, head + r * cell + cell // 2 - 6), label, fill=(230, 230, 230))
        for c, im in enumerate(ims):
            sheet.paste(im.convert("RGB"), (label_w + c * cell, head + r * cell))
    return sheet


def demo_stage(generator: Any, out: Path, *, train_steps: int = 150, seeds: int = 4, steps: int = 20,
               progress: Any = None) -> dict[str, Any]:
    """Train `<star>` on the generator's model (only new vectors; the model is unchanged), then judge the base
    model ("shape") and the embedding on the same prompts and seeds; save a side-by-side sheet."""

    import shutil

    out = Path(out)
    if (out / "ti").exists():  # this stage's own folder from an earlier demo
        shutil.rmtree(out / "ti")
    seed_list = list(range(seeds))
    t0 = time.perf_counter()
    base = judge_prompts(generator_fn(generator, steps), "shape", "star", seed_list, keep=1)
    if progress:
        progress(1, 3)
    res = train_concept(generator.model, out / "ti", token="<star>", shape="star", steps=train_steps,
                        save_every=train_steps, seeds=seeds, evaluate=False, eval_steps=steps)
    if progress:
        progress(2, 3)
    generator.embeddings.add_source(res["final"])
    try:
        emb = judge_prompts(generator_fn(generator, steps), "<star>", "star", seed_list, keep=1)
    finally:  # later stages see the plain model again (the file's stem "star" would shadow the word)
        generator.embeddings.remove_source(res["final"])
    if progress:
        progress(3, 3)
    prompts = [p.format(t="...") for p in FIDELITY] + [f"a {c} ... {b}" for c, b in CONTEXT]
    sheet = side_by_side([("base: shape", base.pop("images")), ("<star>", emb.pop("images"))], prompts)
    with atomic_path(out / "ti_grid.png") as tmp:
        sheet.save(tmp, format="PNG")
    keys = ("shape_fidelity", "context_kept", "context_shape")
    return {"ti": {"base": {k: base[k] for k in keys}, "embedding": {k: emb[k] for k in keys},
                   "train_steps": train_steps, "train_seconds": res["seconds_training"],
                   "seconds": round(time.perf_counter() - t0, 1), "file": str(res["final"]),
                   "grid": str(out / "ti_grid.png"), "images_per_prompt": seeds}}


def report_lines(fig: dict[str, Any]) -> list[str]:
    b, e = fig["base"], fig["embedding"]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    return [
        f"textual inversion: <star> trained from 5 rendered stars, {fig['train_steps']} steps in "
        f"{fig['train_seconds']} s (file {fig['file']})",
        f"  star drawn, 'a photo of a <star>'-style prompts: base ('shape') {pct(b['shape_fidelity'])} -> "
        f"<star> {pct(e['shape_fidelity'])}",
        f"  new colour + background ('a blue <star> on a black background'): context kept {pct(e['context_kept'])} "
        f"(base {pct(b['context_kept'])}), star drawn {pct(e['context_shape'])} (base {pct(b['context_shape'])})",
        f"  side by side: {fig['grid']}",
    ]
