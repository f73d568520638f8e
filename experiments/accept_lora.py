"""Acceptance of LoRA / DreamBooth on the toy world: learn the shape "heart" (never in the tiny model's training)
from 20 images, then measure with the judge.

    nice -n 19 python experiments/accept_lora.py --out runs/accept                 # everything, one after another
    python experiments/accept_lora.py --out runs/accept --only lora               # one variant (run several in parallel)
    python experiments/accept_lora.py --out runs/accept --summary                 # the table from the saved results

Variants: lora (no prior preservation), lora_prior (prior preservation), dreambooth (full UNet fine-tune, prior
preservation), style (a second LoRA: a style on known shapes, for the two-LoRA test; `--style outline`, the
default, is trained with the caption word "outlined", the tiny model having no word for it; `--style blurry`
without any word, since the base model knows "blurry"; results in OUT/<style>), two (heart LoRA + style LoRA
together; needs lora and the style). `outline` in --only means style with --style outline.

Data: 20 hearts of random colour and background, each caption naming its colour ("a {colour} sks shape", half
of them also "on a {background} background"). Class images for prior preservation (default
`--class-source base-prompts`): 40 images the base model makes for random base prompts, each captioned with its
prompt (kohya-style regularization images), cached in OUT/reg_images. Latents: posterior means (`--latents mean`),
what the tiny model was trained on.

Measured per variant (judge = sdtune.toy.judge, no learned weights):
  * identifier: "a sks shape", seeds 0..S-1 -> % hearts;
  * context: "a {colour} sks shape", "a sks shape on a {background} background" and both together, for every
    colour/background -> % hearts, and % where every colour/background word asked for is in the image;
  * base prompts (without the identifier), a fixed subset of "a {colour} {shape} on a {background} background"
    -> judge agreement (mean of colour/shape/background agreement), compared with the base model's.
Training time is wall-clock of the training call (incl. latent caching and class-image generation).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

# Every caption names the colour: what varies across the images and is not the concept belongs in the caption
# (a caption without it teaches the identifier to stand for "any colour", and the LoRA's weaker hold on colour
# words then shows in base prompts too: measured 52% colour agreement on base prompts with colour-free captions).
TEMPLATES = ("a {colour} sks shape", "a {colour} sks shape on a {background} background")
VARIANTS = ("lora", "lora_prior", "dreambooth", "style", "two")
# The prompt word of each style LoRA: outline is trained with "outlined" (the tiny model has no word of its own for
# it); blurry with none (the base model knows "blurry", so a worded style LoRA would test the word, not the LoRA).
STYLE_WORDS = {"outline": "outlined ", "blurry": ""}


def make_data(folder: Path, n: int, seed: int, style: str | None = None, heart_styles: tuple[str, ...] = ("solid",)
              ) -> Path:
    from sdtune.toy import world
    from sdtune.toy.evaluate import write_dataset

    if (folder / "0000.png").exists():
        return folder
    rng = random.Random(seed)
    if style:  # the style on known and word-less shapes, captioned with the world's words ("a outlined red circle
        # on ...", "a outlined red shape on ..."; without the style word if it has none): a style LoRA needs varied
        # subjects, and the generic "shape" is what the heart's prompts say (trained on known shapes only, the
        # outline LoRA outlined 65% of them and 0% of hearts)
        scenes = [world.random_scene(rng, shapes=world.KNOWN_SHAPES + world.WORDLESS_SHAPES, styles=(style,))
                  for _ in range(n)]
        caps = [(s if STYLE_WORDS[style] else replace(s, style="solid")).caption() for s in scenes]
    else:
        # other styles than solid are named in the caption ("a blurry red sks shape"): the rendering is then not
        # part of what "sks" means, which leaves it to a style LoRA
        scenes = [world.random_scene(rng, shapes=("heart",), styles=heart_styles) for _ in range(n)]
        caps = [rng.choice(TEMPLATES).format(colour=("" if s.style == "solid" else s.style + " ") + s.colour,
                                             background=s.background) for s in scenes]
    write_dataset(folder, scenes, caps)
    return folder


def make_reg_images(folder: Path, n: int, args) -> Path:
    """Regularization (class) images as kohya users make them: the base model's own images for varied prompts of
    the class ("a {colour} {shape} on a {background} background", every known shape), each with its prompt as
    the .txt caption, so the prior term protects what those words meant before."""
    from sdtune.generate import GenerationParams, Generator
    from sdtune.toy.evaluate import base_prompts

    if (folder / f"{n - 1:04d}.txt").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed + 7)
    gen = Generator(args.model)
    prompts = base_prompts()
    for i in range(n):
        prompt = rng.choice(prompts)[0]
        img = gen.generate(GenerationParams(prompt=prompt, seed=i, steps=args.gen_steps, cfg_scale=7.0))[0].image
        img.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(prompt + "\n")
    return folder


def base_subset(n: int) -> list:
    from sdtune.toy.evaluate import base_prompts

    prompts = base_prompts()
    rng = random.Random(1234)
    return sorted(rng.sample(prompts, n), key=lambda p: p[0])


def context_prompts(pre: str = "") -> list:
    """The identifier with every colour, background and both; `pre` is a style word ("outlined ")."""
    from sdtune.toy import world

    out = []
    for c in world.COLOURS:
        out.append((f"a {pre}{c} sks shape", {"colour": c}))
    for b in world.BACKGROUNDS:
        out.append((f"a {pre}sks shape on a {b} background", {"background": b}))
    for c in world.COLOURS:
        for b in world.BACKGROUNDS:
            out.append((f"a {pre}{c} sks shape on a {b} background", {"colour": c, "background": b}))
    return out


def judge_prompts(gen, prompts: list, seeds: int, steps: int, want_style: str | None = None, shape: str = "heart"
                  ) -> dict:
    """% of images of the concept `shape` (reported under the key "heart", whatever the shape), with the context
    words asked for, and with the style."""
    from sdtune.generate import GenerationParams
    from sdtune.toy.judge import judge

    n = hearts = ctx = both = styled = heart_styled = 0
    for prompt, wanted in prompts:
        params = GenerationParams(prompt=prompt, seed=0, batch_size=seeds, steps=steps, cfg_scale=7.0)
        for img in gen.generate(params):
            v = judge(img.image)
            ok = all(getattr(v, k) == val for k, val in wanted.items())
            n += 1
            hearts += v.shape == shape
            ctx += ok
            both += ok and v.shape == shape
            if want_style:
                styled += v.style == want_style
                heart_styled += v.style == want_style and v.shape == shape
    out = {"images": n, "heart": hearts / n, "context": ctx / n, "heart_and_context": both / n}
    if want_style:
        out["style"] = styled / n
        out["heart_and_style"] = heart_styled / n  # both LoRAs show in the same image
    return out


def evaluate_model(gen, args, style: str | None = None, what: str = "heart") -> dict:
    """what: heart (identifier + context + base prompts), style (base prompts with the style's word), two (both
    LoRAs; identifier and context prompts with the style's word)."""
    from sdtune.toy.evaluate import evaluate

    t = time.perf_counter()
    out: dict = {}
    pre = STYLE_WORDS[style] if style else ""
    if style:
        out["style"] = style
    if what == "style":
        prompts = [(p.replace("a ", "a " + pre, 1), {"colour": sc.colour, "shape": sc.shape,
                                                     "background": sc.background})
                   for p, sc in base_subset(args.base_prompts)]
        out["style_prompts"] = judge_prompts(gen, prompts, args.base_seeds, args.gen_steps, want_style=style)
    else:
        shape = getattr(args, "shape", "heart")
        out["identifier"] = judge_prompts(gen, [(f"a {pre}sks shape", {})], args.ident_seeds, args.gen_steps,
                                          want_style=style, shape=shape)
        out["context"] = judge_prompts(gen, context_prompts(pre), args.ctx_seeds, args.gen_steps, want_style=style,
                                       shape=shape)
    if what == "heart":
        base = evaluate(gen, base_subset(args.base_prompts), seeds=args.base_seeds, steps=args.gen_steps)
        rates = base.rates
        out["base"] = {"images": base.n_images, **{k: rates[k] for k in ("colour", "shape", "background")},
                       "agreement": (rates["colour"] + rates["shape"] + rates["background"]) / 3}
    out["eval_s"] = time.perf_counter() - t
    return out


def train_variant(variant: str, args, out: Path) -> dict:
    from sdtune.training import TrainConfig, train
    from sdtune.training.methods.dreambooth import DreamBoothOptions
    from sdtune.training.methods.lora import LoraOptions

    heart_styles = tuple(args.heart_styles.split(","))
    heart_data = "data_heart" if heart_styles == ("solid",) else "data_heart_" + "_".join(heart_styles)
    data = make_data(out / ("data_" + args.style if variant == "style" else heart_data), args.images, args.seed,
                     style=args.style if variant == "style" else None, heart_styles=heart_styles)
    common = dict(model=args.model, data=str(data), out=str(out / result_dir(variant, args)), batch_size=args.batch,
                  save_every=args.save_every, keep_checkpoints="all" if args.save_every else "best",
                  progress=False, tensorboard=False, seed=args.seed, sample_steps=args.gen_steps, latents=args.latents,
                  caption_dropout=args.caption_dropout)
    class_prompt = "a shape on a background"
    class_data = str(make_reg_images(out / "reg_images", args.class_images, args)) \
        if args.class_source == "base-prompts" and variant in ("lora_prior", "dreambooth") else None
    if variant in ("lora", "lora_prior", "style"):
        extra: dict = {}
        if variant == "style" and args.style_te_lr:  # text-encoder LoRAs too: "outlined" becomes a word
            extra = dict(text_encoder=True, text_encoder_lr=args.style_te_lr)
        if variant == "lora_prior":
            extra = dict(class_prompt=class_prompt, num_class_images=args.class_images, class_data=class_data,
                         prior_weight=args.prior_weight)
        opts = LoraOptions(rank=args.rank, alpha=args.rank, targets=args.targets.split(","), **extra)
        cfg = TrainConfig(method="lora", steps=args.lora_steps, lr=args.lora_lr, options=opts, **common)
    else:
        opts = DreamBoothOptions(class_prompt=class_prompt, num_class_images=args.class_images, class_data=class_data,
                                 prior_weight=args.prior_weight, save_precision="fp32", diffusers_folder=True)
        cfg = TrainConfig(method="dreambooth", steps=args.db_steps, lr=args.db_lr, options=opts, **common)
    t, c = time.perf_counter(), time.process_time()
    r = train(cfg, echo=lambda s: print(f"[{variant}] {s}", flush=True))
    return {"train_s": time.perf_counter() - t, "train_cpu_s": time.process_time() - c, "final": str(r.final),
            "steps": cfg.steps, "lr": cfg.lr,
            "last_loss": sum(r.losses[-20:]) / len(r.losses[-20:]), "options": cfg.to_dict()[cfg.method]}


def result_dir(variant: str, args) -> str:
    """Where a variant's result.json goes: the style LoRA in OUT/<style>; two in OUT/two, or OUT/two_<style> for
    another style than outline, with _<weights> for other weights than 1,1 (two_0.6_1, two_blurry_0.6_1)."""
    if variant == "style":
        return args.style
    name = variant if variant != "two" or args.style == "outline" else f"two_{args.style}"
    if variant == "two" and tuple(args.two_weights) != (1.0, 1.0):
        return name + "_" + "_".join(f"{w:g}" for w in args.two_weights)
    return name


def run_variant(variant: str, args, out: Path) -> dict:
    from sdtune.generate import Generator

    if variant == "base":
        gen = Generator(args.model)
        res = {"variant": "base", **evaluate_model(gen, args),
               **evaluate_model(gen, args, style=args.style, what="style")}
    elif variant == "two":
        a, b = (json.loads((out / v / "result.json").read_text()) for v in (args.heart_variant, args.style))
        wa, wb = args.two_weights
        gen = Generator(args.model, loras=[(a["final"], wa), (b["final"], wb)])
        res = {"variant": "two", "loras": [a["final"], b["final"]], "weights": [wa, wb],
               **evaluate_model(gen, args, style=args.style, what="two")}
    else:
        saved = out / result_dir(variant, args) / "result.json"
        if args.skip_train and saved.exists():  # re-judge the saved file with this run's evaluation settings
            trained = {k: v for k, v in json.loads(saved.read_text()).items()
                       if k in ("train_s", "train_cpu_s", "final", "steps", "lr", "last_loss", "options")}
        else:
            trained = train_variant(variant, args, out)
        if variant == "dreambooth":
            gen = Generator(trained["final"])   # the single-file checkpoint, as A1111 would load it
        else:
            gen = Generator(args.model, loras=[(trained["final"], 1.0)])
        res = {"variant": variant, **trained,
               **evaluate_model(gen, args, style=args.style if variant == "style" else None,
                                what="style" if variant == "style" else "heart")}
    (out / result_dir(variant, args)).mkdir(parents=True, exist_ok=True)
    (out / result_dir(variant, args) / "result.json").write_text(json.dumps(res, indent=1))
    return res


def summary(out: Path) -> str:
    rows = {}
    twos = sorted(p.name for p in out.glob("two_*") if p.is_dir())
    for v in ("base", "lora", "lora_prior", "dreambooth") + tuple(STYLE_WORDS) + ("two",) + tuple(twos):
        p = out / v / "result.json"
        if p.exists():
            rows[v] = json.loads(p.read_text())
    base = rows.get("base", {}).get("base", {}).get("agreement")
    lines = ["| variant | train time | identifier prompt: heart | context prompts: heart | context kept | base prompts: "
             "judge agreement (change) |", "| --- | --- | --- | --- | --- | --- |"]
    for v, r in rows.items():
        t = f"{r['train_s'] / 60:.1f} min wall, {r['train_cpu_s'] / 60:.1f} min CPU ({r['steps']} steps)" \
            if "train_s" in r else "-"
        style = r.get("style", "outline")  # results written before --style are the outline's
        if "style_prompts" in r or "outline_prompts" in r:
            o = r.get("style_prompts") or r["outline_prompts"]
            word = STYLE_WORDS[style].strip()
            lines.append(f"| {v} | {t} | base prompts{' with ' + word if word else ''}: style {style} "
                         f"{100 * o['style']:.0f}% of {o['images']}, colour+shape+background all right "
                         f"{100 * o['context']:.0f}% | | | |")
            if "identifier" not in r:
                continue
        ident, ctx, b = r["identifier"], r["context"], r.get("base")
        change = f" ({100 * (b['agreement'] - base):+.1f} pt)" if b and base is not None and v != "base" else ""
        extra = f"; style {style} {100 * ident['style']:.0f}%" if "style" in ident else ""
        cextra = f"; style {style} {100 * ctx['style']:.0f}%" if "style" in ctx else ""
        if "heart_and_style" in ident:
            extra += f"; {style} heart {100 * ident['heart_and_style']:.0f}%"
            cextra += f"; {style} heart {100 * ctx['heart_and_style']:.0f}%"
        bcol = f"{100 * b['agreement']:.1f}%{change}" if b else "-"
        label = f"{v} (weights {', '.join(f'{w:g}' for w in r['weights'])})" if "weights" in r else v
        lines.append(f"| {label} | {t} | {100 * ident['heart']:.0f}% of {ident['images']}{extra} | "
                     f"{100 * ctx['heart']:.0f}% of {ctx['images']}{cextra} | {100 * ctx['context']:.0f}% | {bcol} |")
    return "\n".join(lines)


def two_weights(text: str) -> tuple[float, float]:
    """'0.6,1' -> (0.6, 1.0); anything else is a one-line usage error."""
    try:
        wa, wb = (float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two weights; write e.g. 0.6,1") from None
    return wa, wb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/accept"))
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--only", default=None, help="comma-separated: base," + ",".join(VARIANTS))
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--two-weights", default="1,1", type=two_weights,
                    help="two: weights of the heart and style LoRAs, e.g. 0.6,1")
    ap.add_argument("--heart-variant", default="lora", choices=("lora", "lora_prior"),
                    help="two: the heart LoRA to combine with the style LoRA")
    ap.add_argument("--style", default="outline", choices=tuple(STYLE_WORDS),
                    help="the style LoRA's style (style and two variants)")
    ap.add_argument("--skip-train", action="store_true",
                    help="re-evaluate the files of earlier runs in OUT (e.g. with more --ident-seeds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="attn,ff,conv")
    ap.add_argument("--lora-steps", type=int, default=800)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--heart-styles", default="solid",
                    help="styles of the heart images, e.g. solid,blurry,noisy (non-solid ones named in captions)")
    ap.add_argument("--save-every", type=int, default=0, help="keep a checkpoint every N steps (0: the last only)")
    ap.add_argument("--style-te-lr", "--outline-te-lr", type=float, default=0.0,
                    help="style: also train text-encoder LoRAs at this rate (0: UNet only)")
    ap.add_argument("--db-steps", type=int, default=800)
    ap.add_argument("--db-lr", type=float, default=2e-4)
    ap.add_argument("--class-images", type=int, default=40)
    ap.add_argument("--prior-weight", type=float, default=1.0)
    ap.add_argument("--class-source", default="base-prompts", choices=("base-prompts", "class-prompt"),
                    help="class images: the base model's images of varied captioned base prompts (kohya-style "
                    "regularization images), or generated by the trainer from the one class prompt")
    ap.add_argument("--latents", default="auto", choices=("auto", "mean", "sample"),
                    help="auto: posterior means for the tiny model (its sdtune.json), what it was trained on")
    ap.add_argument("--caption-dropout", type=float, default=0.0)
    ap.add_argument("--gen-steps", type=int, default=20)
    ap.add_argument("--ident-seeds", type=int, default=16)
    ap.add_argument("--ctx-seeds", type=int, default=2)
    ap.add_argument("--base-prompts", type=int, default=16)
    ap.add_argument("--base-seeds", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        todo = args.only.split(",") if args.only else ["base", "lora", "lora_prior", "dreambooth", "style", "two"]
        if "outline" in todo:  # the older name of the style variant
            if args.style != "outline":
                raise SystemExit("--only outline trains the outline style; use --only style with --style")
            todo = ["style" if v == "outline" else v for v in todo]
        unknown = set(todo) - {"base", *VARIANTS}
        if unknown:
            raise SystemExit(f"unknown variant(s) {', '.join(sorted(unknown))}; use base," + ",".join(VARIANTS))
        for v in todo:
            t = time.perf_counter()
            r = run_variant(v, args, out)
            print(f"== {v} done ({time.perf_counter() - t:.0f}s)", flush=True)
            print(summary(out), flush=True)
    print(summary(out))


if __name__ == "__main__":
    main()
