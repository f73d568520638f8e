"""What `--keep-base 1` costs per training step against the same LoRA run without it (not a test).

    OMP_NUM_THREADS=1 python bench/keep_base_cost.py [--images 20] [--steps 100] [--repeats 2]

All in one process on the bundled tiny model, the README's toy LoRA settings (rank 8, alpha 8, attn + ff + conv,
batch 4, lr 1e-3, 64 px), toy hearts captioned "a {colour} sks shape": the two variants alternate `--repeats`
times, each on a deep copy of the model loaded once (loading is not measured). Prints the median wall time
(`time.perf_counter`) and CPU time of this process per variant and the ratio keep-base / plain.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch

    from sdtune.models import load_model
    from sdtune.toy.testing import write_toy_dataset
    from sdtune.training import TrainConfig, train
    from sdtune.training.methods.lora import LoraOptions

    root = Path(tempfile.mkdtemp(prefix="keep-base-bench-"))
    data = write_toy_dataset(root / "data", args.images, size=64, shapes=("heart",), caption="a {colour} sks shape")
    model = load_model("tiny")
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "keep-base 1": []}
    for r in range(args.repeats):
        for name, weight in (("plain", 0.0), ("keep-base 1", 1.0)):
            options = LoraOptions(rank=8, alpha=8, targets=["attn", "ff", "conv"], keep_base=weight)
            cfg = TrainConfig(method="lora", data=str(data), out=str(root / f"{r}-{weight}"), steps=args.steps,
                              lr=1e-3, batch_size=4, resolution=64, save_every=0, progress=False,
                              tensorboard=False, options=options)
            wall, cpu = time.perf_counter(), time.process_time()
            train(cfg, model=copy.deepcopy(model), echo=lambda s: None)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
          f"{args.images} images, {args.steps} steps, {args.repeats} repeat(s), medians")
    base = statistics.median(w for w, _ in times["plain"])
    for name, rows in times.items():
        wall, cpu = statistics.median(w for w, _ in rows), statistics.median(c for _, c in rows)
        print(f"{name:12s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  ratio {wall / base:.2f}x")


if __name__ == "__main__":
    main()
