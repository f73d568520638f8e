"""Experiment behind `--keep-uncond`: a trained hypernetwork applied to the conditional half of the CFG batch only
(the empty prompt left to the base model; A1111 has no such mode), judged like experiments/accept_hypernetwork.py.

    python experiments/hypernetwork_cond_only.py runs/hn/train/hypernetwork.safetensors --seeds 2

If the cond-only rate is well above the normal one, guidance is cancelling what the hypernetwork learned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hypernetwork", type=Path)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--eval-shapes", default="circle,square")
    ap.add_argument("--strengths", default="1,0.5")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not args.hypernetwork.is_file():
        raise SystemExit(f"{args.hypernetwork}: no such file")
    import torch

    from accept_hypernetwork import evaluate_with
    from sdtune.adapters.hypernetwork import apply
    from sdtune.generate import Generator
    from sdtune.toy.evaluate import base_prompts

    torch.set_num_threads(args.threads)
    both_halves = apply.Stack.transform

    def cond_half_only(self, x, which):  # the pipeline batches [uncond, cond]
        half = x.shape[0] // 2
        return torch.cat([x[:half], both_halves(self, x, which)[half:]])

    gen = Generator(args.model)
    prompts = base_prompts(tuple(args.eval_shapes.split(",")))
    for mode, fn in (("both halves", both_halves), ("cond half only", cond_half_only)):
        apply.Stack.transform = fn
        for s in (float(v) for v in args.strengths.split(",")):
            r = evaluate_with(gen, args.hypernetwork, s, prompts, args.seeds, 20, 7.0)
            print(mode, f"strength {s:g}:", json.dumps({k: r[k] for k in ("images", "style_outline", "shape",
                                                                             "colour", "hollow")}), flush=True)
    apply.Stack.transform = both_halves


if __name__ == "__main__":
    main()
