"""Acceptance measurement for hypernetworks on the toy world (issue 6), end to end:

1. a dataset of at most 50 images in the world's `outline` style (shapes circle and square), captioned in the base
   form ("a red circle on a white background": the style is what is learned, so captions do not name it);
2. `sdtune train hypernetwork` on the bundled `tiny` model through the shared loop (wall time recorded; the goal
   is at most 10 minutes on 2 CPU cores);
3. the judge on base prompts about OTHER shapes (triangle, cross; every colour and background) for the base model
   and the hypernetwork at strength 1 and 0.5: how often it reads the outline style, and shape/colour agreement.

    python scripts/accept_hypernetwork.py --out runs/accept_hn            # writes report.json + report.md there

Goal: outline detected in >= 80% of the images at strength 1, shape and colour agreement at most 10 points below
the base model's; strength 0.5 in between. The figures are printed and written as they are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def make_dataset(folder: Path, n: int, shapes: tuple[str, ...], style: str, seed: int) -> None:
    from sdtune.toy import world
    from sdtune.toy.evaluate import write_dataset

    rng = random.Random(seed)
    scenes = [world.random_scene(rng, shapes=shapes, styles=(style,)) for _ in range(n)]
    caps = [f"a {s.colour} {s.shape} on a {s.background} background" for s in scenes]
    write_dataset(folder, scenes, caps)


def evaluate_with(gen, hn_path: Path | None, strength: float, prompts, seeds: int, steps: int, cfg: float) -> dict:
    from sdtune.toy.evaluate import evaluate

    gen.set_hypernetworks([(hn_path, strength)] if hn_path is not None and strength else [])
    rep = evaluate(gen, prompts, seeds=seeds, steps=steps, cfg_scale=cfg)
    target = "outline"
    styles: dict[str, int] = {}
    for r in rep.records:
        styles[r["style"]] = styles.get(r["style"], 0) + 1
    return {"strength": strength, "images": rep.n_images, "style_outline": styles.get(target, 0) / rep.n_images,
            "shape": rep.rates["shape"], "colour": rep.rates["colour"], "background": rep.rates["background"],
            "styles_seen": styles, "seconds_per_image": rep.seconds_per_image}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/accept_hypernetwork"))
    p.add_argument("--model", default="tiny")
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--train-shapes", default="circle,square")
    p.add_argument("--eval-shapes", default="triangle,cross")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", default="1e-3")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layer-structure", default="1, 4, 1")
    p.add_argument("--activation", default="relu")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seeds", type=int, default=4, help="images per eval prompt")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strengths", default="1,0.5")
    p.add_argument("--val-split", type=float, default=0.0, help="hold out images for a validation loss")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--layer-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--keep-checkpoints", default="all")
    p.add_argument("--select-seeds", type=int, default=1,
                   help="pick the checkpoint with the most outlines on the TRAINING shapes' prompts (0 = last)")
    p.add_argument("--skip-train", action="store_true", help="reuse OUT/train/hypernetwork.safetensors")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sdtune.generate import Generator
    from sdtune.toy import world
    from sdtune.toy.evaluate import base_prompts
    from sdtune.training import TrainConfig, train

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not data.exists():
        make_dataset(data, args.images, tuple(args.train_shapes.split(",")), "outline", seed=0)
    hn_path = out / "train" / "hypernetwork.safetensors"
    train_info: dict = {}
    if not args.skip_train:
        cfg = TrainConfig(method="hypernetwork", model=args.model, data=str(data), out=str(out / "train"),
                          steps=args.steps, lr=args.lr, batch_size=args.batch, weight_decay=args.weight_decay,
                          save_every=args.save_every, progress=False, tensorboard=False, seed=0, resume="auto",
                          val_split=args.val_split, keep_checkpoints=args.keep_checkpoints)
        cfg.options.layer_structure = args.layer_structure
        cfg.options.activation = args.activation
        cfg.options.layer_norm = args.layer_norm
        t0 = time.perf_counter()
        result = train(cfg, echo=lambda s: print(s, flush=True))
        minutes = (time.perf_counter() - t0) / 60
        hn_path = result.final
        losses = result.losses
        train_info = {"rows": result.rows, "steps": result.step, "minutes": round(minutes, 2), "first_loss_mean10": sum(losses[:10]) / 10,
                      "last_loss_mean10": sum(losses[-10:]) / 10, "file": str(hn_path)}
        print(f"trained {result.step} steps in {minutes:.2f} min -> {hn_path}", flush=True)

    prompts = base_prompts(tuple(args.eval_shapes.split(",")))
    gen = Generator(args.model)
    ckpts = sorted((out / "train" / "checkpoints").glob("*.safetensors"))
    if args.select_seeds and len(ckpts) > 1:
        # model selection on the prompts of the training shapes only: the eval shapes stay unseen
        sel_prompts = base_prompts(tuple(args.train_shapes.split(",")))
        sel = []
        for c in ckpts:
            r = evaluate_with(gen, c, 1.0, sel_prompts, args.select_seeds, args.sample_steps, args.cfg)
            sel.append((r["style_outline"], r["colour"], r["shape"], c.name))
            print(f"selection {c.name}: outline {r['style_outline']:.3f} colour {r['colour']:.3f} "
                  f"shape {r['shape']:.3f}", flush=True)
        best = max(sel)
        hn_path = out / "train" / "checkpoints" / best[3]
        train_info["selection"] = {"by": "outline, then colour, then shape on training-shape prompts",
                                   "rows": sel, "chosen": best[3]}
        print(f"chosen: {hn_path}", flush=True)
    rows = [evaluate_with(gen, None, 0.0, prompts, args.seeds, args.sample_steps, args.cfg)]
    print("base:", json.dumps(rows[-1]), flush=True)
    for s in [float(x) for x in args.strengths.split(",")]:
        rows.append(evaluate_with(gen, hn_path, s, prompts, args.seeds, args.sample_steps, args.cfg))
        print(f"strength {s:g}:", json.dumps(rows[-1]), flush=True)
    base, full = rows[0], rows[1]
    verdict = {"outline_at_1_ge_80": full["style_outline"] >= 0.8,
               "shape_drop_le_10": base["shape"] - full["shape"] <= 0.10,
               "colour_drop_le_10": base["colour"] - full["colour"] <= 0.10}
    report = {"evaluated_file": str(hn_path), "args": {k: str(v) for k, v in vars(args).items()}, "train": train_info, "rows": rows,
              "goal": verdict, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "world_shapes_eval": args.eval_shapes, "known_shapes": list(world.KNOWN_SHAPES)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| model | outline detected | shape agreement | colour agreement | background |", "|---|---|---|---|---|"]
    for r in rows:
        name = "base" if r["strength"] == 0 else f"hypernetwork strength {r['strength']:g}"
        lines.append(f"| {name} | {100 * r['style_outline']:.1f}% | {100 * r['shape']:.1f}% | "
                     f"{100 * r['colour']:.1f}% | {100 * r['background']:.1f}% |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("goal:", verdict)


if __name__ == "__main__":
    main()
