"""Two LoRAs together, one heart LoRA file or every checkpoint of a heart run against one style LoRA: how often
the judge reads a heart in the style, outlined by default (experiments/accept_lora.py's "two" evaluation, without its
bookkeeping).

    python experiments/sweep_two_loras.py runs/acc6/lora_prior/checkpoints runs/acc3/outline/lora.safetensors --weights 1,1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("heart", type=Path, help="a heart LoRA file, or a folder of them (checkpoints)")
    ap.add_argument("style", type=Path, help="the style LoRA file")
    ap.add_argument("--style-name", default="outline", help="its style: outline or blurry (accept_lora --style)")
    ap.add_argument("--weights", default="1,1", type=lambda t: tuple(float(w) for w in t.split(",")))
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=Path, default=None,
                    help="also save seeds 0-3 of the identifier prompt ('a outlined sks shape') per file, one row "
                    "each, to this PNG")
    args = ap.parse_args()
    import torch

    import accept_lora
    from sdtune.generate import Generator

    torch.set_num_threads(args.threads)
    files = sorted(args.heart.glob("*.safetensors")) if args.heart.is_dir() else [args.heart]
    if not files or not all(f.is_file() for f in files) or not args.style.is_file():
        raise SystemExit(f"no heart LoRA in {args.heart}, or no style LoRA {args.style}")
    ev = SimpleNamespace(ident_seeds=16, ctx_seeds=2, gen_steps=20)
    wh, ws = args.weights
    rows = []
    for f in files:
        gen = Generator(args.model, loras=[(str(f), wh), (str(args.style), ws)])
        r = accept_lora.evaluate_model(gen, ev, style=args.style_name, what="two")
        row = {k: {m: round(x, 3) for m, x in v.items() if m != "images"} for k, v in r.items() if isinstance(v, dict)}
        print(f"{f} weights {wh:g},{ws:g}: {json.dumps(row)}", flush=True)
        if args.grid:
            from sdtune.generate import GenerationParams

            params = GenerationParams(prompt=f"a {accept_lora.STYLE_WORDS[args.style_name]}sks shape", seed=0,
                                      batch_size=4, steps=20, cfg_scale=7.0)
            rows.append([img.image for img in gen.generate(params)])
    if args.grid:
        from sdtune.generate.grid import make_grid

        make_grid([im for row in rows for im in row], cols=4).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
