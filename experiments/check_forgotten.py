"""What the tiny model's forgotten words still draw (docs/toy-world.md): judge an export made with --keep-forgotten.

    sdtune toy build-tiny export --work runs/tiny2 --out runs/tiny_keep --ema --keep-forgotten
    python experiments/check_forgotten.py runs/tiny_keep [--seeds 2]

Rows: "a {colour} zstar on a {bg} background" (star), the same for zdiamond, "a zoutline {colour} circle/square on a
{bg} background" (outline style), and the plain circle/square prompts for comparison; every colour and background.
"""

from __future__ import annotations

import argparse
import itertools


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a tiny-model export made with --keep-forgotten")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    from sdtune.generate import Generator
    from sdtune.toy import world
    from sdtune.toy.evaluate import evaluate

    gen = Generator(args.model)
    forgotten = world.FORGOTTEN_WORDS
    rows = [("zstar", ["star"], "solid"), ("zdiamond", ["diamond"], "solid"),
            ("zoutline circle/square", ["circle", "square"], "outline"),
            ("plain circle/square", ["circle", "square"], "solid")]
    for name, shapes, style in rows:
        prompts = []
        for shape, colour, bg in itertools.product(shapes, world.COLOURS, world.BACKGROUNDS):
            style_word = forgotten[style] + " " if style in forgotten else ""
            prompts.append((f"a {style_word}{colour} {forgotten.get(shape, shape)} on a {bg} background",
                            world.Scene(shape, colour, bg, style=style)))
        print(name, evaluate(gen, prompts, seeds=args.seeds, steps=20, cfg_scale=7).summary(), flush=True)


if __name__ == "__main__":
    main()
