"""Acceptance of Textual Inversion on the toy world (not a test): train `<star>` from 5 rendered stars (red on
white, blue on gray, green on black, yellow on white, purple on gray: none of the judge's new-context pairs) on the
bundled tiny model and judge it (see `sdtune.toy.ti`). Also trains a second embedding, `<dark>` (the black
background, learned from 5 images of known shapes), and judges prompts that use both.

    python bench/accept_ti.py [--model tiny] [--steps 300] [--threads 2] [--out runs/accept_ti]

Prints per saved step: shape fidelity, context kept, shape in new contexts; the base model's figures with the word
"shape" in place of the token; the training time (without evaluation) and the whole run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main() -> None:
    from sdtune.toy import ti

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--lr", default="5e-3")
    ap.add_argument("--vectors", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="star")
    ap.add_argument("--colours", default=",".join(ti.COLOURS), help="comma-separated; image i has colour i mod len")
    ap.add_argument("--backgrounds", default=",".join(ti.BACKGROUNDS),
                    help="comma-separated; image i has background i mod len")
    ap.add_argument("--second", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="runs/accept_ti")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sdtune.generate import Generator
    from sdtune.models import load_model
    from sdtune.toy.judge import judge

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model = load_model(args.model, device="cpu")
    print(f"model {model.name} (hash {model.hash}); torch threads {torch.get_num_threads()}; {args.steps} steps, batch {args.batch}, "
          f"lr {args.lr}, {args.vectors} vectors; {args.seeds} seeds per prompt", flush=True)
    seeds = list(range(args.seeds))
    base = ti.judge_prompts(ti.generator_fn(Generator(model)), "shape", args.shape, seeds)
    print("base model, 'shape' in place of the token: " + json.dumps({k: round(v, 3) for k, v in base.items()}),
          flush=True)
    token = f"<{args.shape}>"
    res = ti.train_concept(model, out / args.shape, token=token, shape=args.shape, steps=args.steps, lr=args.lr,
                           vectors=args.vectors, save_every=args.save_every, seeds=args.seeds,
                           batch_size=args.batch, echo=lambda s: None, colours=tuple(args.colours.split(",")),
                           backgrounds=tuple(args.backgrounds.split(",")))
    print(f"trained {token}: {res['seconds_training']} s training (+ {res['seconds_eval']} s judging "
          f"checkpoints), best step {res['best_step']}, file {res['final']}")
    for r in res["rows"]:
        print(f"  step {r['step']:4d}: shape fidelity {100 * r['shape_fidelity']:.0f}%, context kept "
              f"{100 * r['context_kept']:.0f}%, shape in new contexts {100 * r['context_shape']:.0f}%")
    summary = {"base": base, "concept": {k: v for k, v in res.items() if k != "losses"}}
    if args.second:
        # a second embedding: the black background, from known shapes in several colours
        from sdtune.adapters.textual_inversion.files import read_embedding
        from sdtune.training import TrainConfig, train
        from sdtune.training.methods.textual_inversion import TIOptions

        import random

        from sdtune.toy import world

        d = out / "dark" / "data"
        d.mkdir(parents=True)
        rng = random.Random(1)
        for i in range(5):
            sc = world.random_scene(rng, shapes=world.KNOWN_SHAPES, backgrounds=("black",))
            world.render(sc).save(d / f"{i:03d}.png")
            (d / f"{i:03d}.txt").write_text(f"{sc.colour} {sc.shape} on a [name] background\n")
        t0 = time.perf_counter()
        r2 = train(TrainConfig(method="ti", data=str(d), out=str(out / "dark" / "run"), steps=args.steps // 2,
                               lr=args.lr, batch_size=args.batch, save_every=0, progress=False, tensorboard=False,
                               latents="mean",
                               options=TIOptions(token="<dark>", init="gray", vectors=1,
                                                 templates=str(ti.write_templates(out / "dark" / "t.txt")))),
                   model=model, echo=lambda s: None)
        t2 = time.perf_counter() - t0
        lib = out / "library"
        lib.mkdir()
        shutil.copy(res["final"], lib / res["final"].name)
        shutil.copy(r2.final, lib / r2.final.name)
        gen = Generator(model, embeddings=[lib])
        fn = ti.generator_fn(gen)
        both = [(f"a {c} {token} on a <dark> background", c) for c in ("red", "blue", "yellow", "green")]
        imgs = fn([p for p, _ in both], seeds)
        n = len(seeds)
        verdicts = [judge(im) for im in imgs]
        shape_ok = sum(v.shape == args.shape for v in verdicts) / len(verdicts)
        bg_ok = sum(v.background == "black" for v in verdicts) / len(verdicts)
        col_ok = sum(v.colour == both[i // n][1] for i, v in enumerate(verdicts)) / len(verdicts)
        all_ok = sum(v.shape == args.shape and v.background == "black" and v.colour == both[i // n][1]
                     for i, v in enumerate(verdicts)) / len(verdicts)
        base_dark = [judge(im) for im in fn(["a red circle on a <dark> background"], seeds)]
        print(f"second embedding <dark> ({args.steps // 2} steps, {t2:.0f} s); loaded with {token} from {lib}: "
              f"{gen.embeddings.names}")
        print(f"  'a {{colour}} {token} on a <dark> background' x{len(verdicts)}: shape {100 * shape_ok:.0f}%, "
              f"black background {100 * bg_ok:.0f}%, colour {100 * col_ok:.0f}%, all three {100 * all_ok:.0f}%")
        print(f"  'a red circle on a <dark> background': black background "
              f"{100 * sum(v.background == 'black' for v in base_dark) / n:.0f}%")
        summary["two_embeddings"] = {"shape": shape_ok, "background": bg_ok, "colour": col_ok, "all": all_ok,
                                     "dark_seconds": t2, "names": gen.embeddings.names,
                                     "dark_file": str(read_embedding(r2.final).path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"summary: {out / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
