"""What reading a LoHa / LoKr file costs in memory: sdtune holds each module as exact LoRA factors of a higher rank
(`src/sdtune/adapters/lora/loha_lokr.py`). For SD1.5 and SDXL layer shapes (models on the meta device, from the
shipped configs; the factors are built on the meta device too, by the same code that reads files, so no memory is
used), kohya's target set (UNet attention, proj_in/proj_out, feed-forward, text encoder(s)) with LyCORIS' default
shapes:

  LoHa dim r      hada_w1_a/w2_a [out, r], hada_w1_b/w2_b [r, in]
  LoKr dim r      factor -1 (LyCORIS `factorization`: the split of each side closest to its square root),
                  lokr_w1 full [a, b]; lokr_w2_a/b of rank r when r < max(c, d) / 2, else lokr_w2 full [c, d]

Columns: parameters in the file, parameters of the rewritten factors, their ratio, the number of modules whose
rewrite is the full delta, and the rewritten factors' size in fp32 / fp16.

Usage: python bench/lycoris_sizes.py
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_sizes import meta_components  # noqa: E402

from sdtune.adapters.lora.loha_lokr import lycoris_module  # noqa: E402
from sdtune.adapters.lora.models import target_modules  # noqa: E402
from sdtune.adapters.lora.testing import KOHYA_UNET, TEXT, _matches  # noqa: E402


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of `dim` into m * n, m <= n, m as close to sqrt(dim) as `factor` allows (its docstring
    table: 1024 -> 32, 32; 1280 -> ... ; 127 -> 1, 127)."""
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


def parts(algo: str, r: int, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    out, inp = shape
    e = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
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
    print(f"# python {platform.python_version()}, torch {torch.__version__}")
    print("| model | network | modules | file params | rewritten params | ratio | full-delta modules | "
          "rewritten fp32 | fp16 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for family in ("sd1", "sdxl"):
        layers = {n: tuple(m.weight.shape) for n, m in target_modules(meta_components(family)).items()
                  if _matches(n.split(".", 1)[1], KOHYA_UNET if n.startswith("unet.") else TEXT)}
        for algo, r in (("LoHa", 4), ("LoHa", 8), ("LoHa", 16), ("LoHa", 32), ("LoKr", 8), ("LoKr", 10000)):
            file_params = new_params = full = 0
            for name, shape in layers.items():
                p = parts(algo, r, shape[:2])
                file_params += sum(t.numel() for t in p.values())
                m = lycoris_module(p, 1.0, name)
                new_params += m.up.numel() + m.down.numel()
                full += int(m.rank == min(shape[0], shape[1]))
            label = f"{algo} dim {r}" if r < 10000 else f"{algo} dim 10000 (full w2)"
            print(f"| {family} | {label} | {len(layers)} | {file_params / 1e6:.2f} M | {new_params / 1e6:.1f} M | "
                  f"{new_params / file_params:.0f}x | {full} | {new_params * 4 / 2**30:.2f} GiB | "
                  f"{new_params * 2 / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
