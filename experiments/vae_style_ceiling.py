"""Which of the toy world's styles survive the model's VAE: renders of each style, encoded (posterior mean) and
decoded, then judged. A style the VAE cannot carry cannot be learned by a LoRA or hypernetwork either.

    python experiments/vae_style_ceiling.py [--model tiny] [--n 40]
"""

from __future__ import annotations

import argparse
import os
import random


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=40, help="renders per (style, shapes) row")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sdtune.models import load_model
    from sdtune.toy import world
    from sdtune.toy.evaluate import vae_round_trip
    from sdtune.toy.judge import judge

    torch.set_num_threads(args.threads)
    vae = load_model(args.model).pipe.vae
    rng = random.Random(1)
    for style in world.STYLES:
        for shapes in (("circle", "square"), ("heart",), ("triangle", "cross")):
            scenes = [world.random_scene(rng, shapes=shapes, styles=(style,)) for _ in range(args.n)]
            images = vae_round_trip(vae, [world.render(s) for s in scenes])
            hits = sum(judge(img).style == style for img in images)
            print(f"{style:8s} {'/'.join(shapes):16s} read as {style}: {100 * hits / args.n:.1f}% of {args.n}",
                  flush=True)


if __name__ == "__main__":
    main()
