"""LoHa/LoKr at generation: sdtune keeps the file's tensors and computes each layer's delta at every forward
(`src/sdtune/adapters/lora/lycoris_hooks.py`). This measures what that costs per UNet + text-encoder forward: the
time to compute every delta of a file (float32, CPU, 1 thread) for SD1.5 layer shapes (meta-device model from the
shipped configs), kohya's target set (UNet attention, proj_in/proj_out, feed-forward, text encoder), LyCORIS'
default shapes:

  LoHa dim r      hada_w1_a/w2_a [out, r], hada_w1_b/w2_b [r, in]
  LoKr dim r      factor -1 (LyCORIS `factorization`: each side split as close to its square root as it goes),
                  lokr_w1 full [a, b]; lokr_w2_a/b of rank r when r < max(c, d) / 2, else lokr_w2 full [c, d]

and the parameters held (the file's). For scale: the first implementation rewrote each module as exact LoRA factors
(commit 6efb2d5, bench/lycoris_sizes.py there): SDXL LoKr dim 8 needed 1114.6 M parameters (4.15 GiB fp32) and a
full-matrix LoKr 4326.6 M (16.12 GiB); this route holds 2.6 M and 3.2 M.

Usage: python bench/lycoris_overhead.py [--family sd1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_sizes import meta_components  # noqa: E402

from sdtune.adapters.lora.loha_lokr import lycoris_module  # noqa: E402
from sdtune.adapters.lora.models import target_modules  # noqa: E402
from sdtune.adapters.lora.testing import KOHYA_UNET, TEXT, _matches  # noqa: E402


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of `dim` into m * n, m <= n (the table in its docstring: 1024 -> 32, 32; 127 -> 1, 127)."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    factor = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return m, n


def parts(algo: str, r: int, shape: tuple[int, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    out, inp = shape
    e = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    if algo == "LoHa":
        return {"hada_w1_a": e(out, r), "hada_w1_b": e(r, inp), "hada_w2_a": e(out, r), "hada_w2_b": e(r, inp)}
    a, c = factorization(out)
    b, d = factorization(inp)
    p = {"lokr_w1": e(a, b)}
    if r < max(c, d) / 2:
        p.update({"lokr_w2_a": e(c, r), "lokr_w2_b": e(r, d)})
    else:
        p["lokr_w2"] = e(c, d)
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# python {platform.python_version()}, torch {torch.__version__}, {platform.processor() or 'cpu'}, "
          "1 thread")
    layers = {n: tuple(m.weight.shape) for n, m in target_modules(meta_components(args.family)).items()
              if _matches(n.split(".", 1)[1], KOHYA_UNET if n.startswith("unet.") else TEXT)}
    print("| model | network | modules | params held | all deltas, per forward (best of "
          f"{args.repeat}) |")
    print("| --- | --- | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    for algo, r in (("LoHa", 8), ("LoHa", 32), ("LoKr", 8), ("LoKr", 10000)):
        mods = [lycoris_module(parts(algo, r, shape[:2], g), 1.0, name) for name, shape in layers.items()]
        held = sum(t.numel() for m in mods for _, t in m.tensors())
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for m in mods:
                m.delta()
            best = min(best, time.perf_counter() - t0)
        label = f"{algo} dim {r}" if r < 10000 else f"{algo} dim 10000 (full w2)"
        print(f"| {args.family} | {label} | {len(mods)} | {held / 1e6:.2f} M | {best * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
