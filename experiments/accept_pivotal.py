"""Pivotal tuning on the toy world: a new word (Textual Inversion) trained with the LoRA, against the LoRA alone and
Textual Inversion alone, at equal steps, on shapes the tiny model cannot name: the heart (never in its training)
and a second one (default: the diamond, trained without a word).

    nice -n 10 python experiments/accept_pivotal.py --out runs/pivotal                  # every shape x method
    python experiments/accept_pivotal.py --out runs/pivotal --only heart:pivotal       # one run
    python experiments/accept_pivotal.py --out runs/pivotal --summary                  # the table

Data per shape: 20 images of random colour and background, captioned "a {colour} sks shape" (half of them also
"on a {background} background"; accept_lora.py's data). The methods see the same images and captions:
  * lora: the LoRA on "sks shape" (rank 8, attn+ff+conv, lr 1e-3);
  * pivotal: the same LoRA with `--pivotal --pivotal-abstraction sks` (2 vectors, init "shape", vector lr 5e-3,
    trained in the first --frac of the steps); prompts use "<s0><s1> shape";
  * ti: Textual Inversion of "<s0><s1>" (2 vectors, init "shape", lr 5e-3, templates "filewords": the same captions
    with the word in place of sks).
Every result is judged from the saved files as a user loads them: the LoRA file alone (pivotal: its bundled word,
no other flag), or the embedding file (ti).

Measured (`sdtune.toy.concept_eval.ConceptJudge`, seeds 0..S-1): fidelity ("a photo of a {t}", "a picture of a
{t}", "a {t}": the shape drawn) and context_both (new colour + background pairs: the shape drawn AND colour and
background as asked: editability), with {t} = "sks shape" (lora) or "<s0><s1> shape" (pivotal, ti); and the base
prompts' judge agreement with the file loaded (what the LoRA costs prompts without the word).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

METHODS = ("lora", "pivotal", "ti")
WORD = "<s0><s1>"


def make_data(folder: Path, shape: str, n: int, seed: int) -> Path:
    from sdtune.toy import world
    from sdtune.toy.evaluate import write_dataset

    from accept_lora import TEMPLATES

    if (folder / f"{n - 1:04d}.png").exists():
        return folder
    rng = random.Random(seed)
    scenes = [world.random_scene(rng, shapes=(shape,)) for _ in range(n)]
    write_dataset(folder, scenes, [rng.choice(TEMPLATES).format(colour=s.colour, background=s.background)
                                   for s in scenes])
    return folder


def ti_data(src: Path, dst: Path) -> Path:
    """The same images, captions with [name] (TI's filewords) in place of sks."""
    if dst.exists():
        return dst
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.suffix == ".txt":
            (dst / p.name).write_text(p.read_text().replace("sks", "[name]"))
        else:
            shutil.copy(p, dst / p.name)
    return dst


def train_one(shape: str, method: str, args, out: Path) -> dict:
    from sdtune.training import TrainConfig, train
    from sdtune.training.methods.lora import LoraOptions
    from sdtune.training.methods.textual_inversion import TIOptions

    data = make_data(out / f"data_{shape}", shape, args.images, args.seed)
    common = dict(model=args.model, out=str(out / f"{shape}_{method}"), steps=args.steps, batch_size=args.batch,
                  save_every=0, progress=False, tensorboard=False, seed=args.seed, latents="auto")
    if method == "ti":
        opts = TIOptions(token=WORD, init="shape", vectors=2, templates="filewords")
        cfg = TrainConfig(method="ti", data=str(ti_data(data, out / f"data_{shape}_ti")), lr=args.ti_lr,
                          options=opts, **common)
    else:
        extra = dict(pivotal=True, pivotal_abstraction="sks", pivotal_init="shape", pivotal_tokens=2,
                     pivotal_frac=args.frac, pivotal_lr=args.ti_lr) if method == "pivotal" else {}
        opts = LoraOptions(rank=8, alpha=8, targets=["attn", "ff", "conv"], **extra)
        cfg = TrainConfig(method="lora", data=str(data), lr=args.lora_lr, options=opts, **common)
    t, c = time.perf_counter(), time.process_time()
    r = train(cfg, echo=lambda s: print(f"[{shape}:{method}] {s}", flush=True))
    res = {"train_s": time.perf_counter() - t, "train_cpu_s": time.process_time() - c, "final": str(r.final),
           "steps": cfg.steps}
    if method == "pivotal":
        res["embedding"] = str(out / f"{shape}_pivotal" / "embeddings" / "s0s1.safetensors")
    return res


def judge_file(shape: str, method: str, trained: dict, args) -> dict:
    from sdtune.generate import GenerationParams, Generator
    from sdtune.toy.concept_eval import ConceptJudge
    from sdtune.toy.evaluate import evaluate

    from accept_lora import base_subset

    if method == "ti":
        gen = Generator(args.model, embeddings=[trained["final"]])
    elif method == "base":
        gen = Generator(args.model)
    else:
        gen = Generator(args.model, loras=[(trained["final"], 1.0)])  # pivotal: the bundled word, no other flag
    term = "sks shape" if method in ("lora", "base") else f"{WORD} shape"

    def generate(prompts: list[str], seeds: list[int]) -> list:
        return [r.image for p in prompts for r in gen.generate(GenerationParams(
            prompt=p, seed=seeds[0], batch_size=len(seeds), steps=args.gen_steps, cfg_scale=7.0))]

    t = time.perf_counter()
    m = ConceptJudge(shape=shape, term=term, seeds=range(args.seeds)).score(generate)
    base = evaluate(gen, base_subset(args.base_prompts), seeds=args.base_seeds, steps=args.gen_steps).rates
    m["base_agreement"] = (base["colour"] + base["shape"] + base["background"]) / 3
    m["eval_s"] = time.perf_counter() - t
    return m


def summary(out: Path) -> str:
    lines = ["| shape | method | fidelity | context_both | judge_score | base prompts: agreement | training |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(out.glob("*/result.json")):
        r = json.loads(p.read_text())
        t = f"{r['train_s'] / 60:.1f} min wall, {r['train_cpu_s'] / 60:.1f} min CPU ({r['steps']} steps)" \
            if "train_s" in r else "-"
        lines.append(f"| {r['shape']} | {r['method']} | {100 * r['fidelity']:.0f}% | {100 * r['context_both']:.0f}% | "
                     f"{100 * r['judge_score']:.0f}% | {100 * r['base_agreement']:.1f}% | {t} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/pivotal"))
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--shapes", default="heart,diamond")
    ap.add_argument("--only", default=None, help="comma-separated shape:method (method: base, lora, pivotal, ti)")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--ti-lr", type=float, default=5e-3)
    ap.add_argument("--frac", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=16, help="judge seeds per fidelity/context prompt")
    ap.add_argument("--base-prompts", type=int, default=24)
    ap.add_argument("--base-seeds", type=int, default=2)
    ap.add_argument("--gen-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.summary:
        print(summary(args.out))
        return
    runs = [tuple(x.split(":")) for x in args.only.split(",")] if args.only else \
        [(s, m) for s in args.shapes.split(",") for m in ("base",) + METHODS]
    for shape, method in runs:
        folder = args.out / f"{shape}_{method}"
        trained = {} if method == "base" else train_one(shape, method, args, args.out)
        res = {"shape": shape, "method": method, **trained, **judge_file(shape, method, trained, args)}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text(json.dumps(res, indent=1))
        print(summary(args.out), flush=True)


if __name__ == "__main__":
    main()
