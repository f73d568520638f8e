"""Which of the toy world's styles survive the model's VAE: renders of each style, encoded (posterior mean) and
decoded, then judged. A style the VAE cannot carry cannot be learned by a LoRA or hypernetwork either.

    python scripts/vae_style_ceiling.py [--model tiny] [--n 40]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=40, help="renders per (style, shapes) row")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from PIL import Image

    from sdtune.models import load_model
    from sdtune.toy import world
    from sdtune.toy.judge import judge

    torch.set_num_threads(args.threads)
    vae = load_model(args.model).pipe.vae
    rng = random.Random(1)
    for style in world.STYLES:
        for shapes in (("circle", "square"), ("heart",), ("triangle", "cross")):
            hits = 0
            for _ in range(args.n):
                scene = world.random_scene(rng, shapes=shapes, styles=(style,))
                x = torch.from_numpy(np.asarray(world.render(scene), dtype=np.float32) / 127.5 - 1)
                with torch.no_grad():
                    y = vae.decode(vae.encode(x.permute(2, 0, 1)[None]).latent_dist.mean).sample[0]
                img = Image.fromarray(((y.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
                hits += judge(img).style == style
            print(f"{style:8s} {'/'.join(shapes):16s} read as {style}: {100 * hits / args.n:.1f}% of {args.n}",
                  flush=True)


if __name__ == "__main__":
    main()
