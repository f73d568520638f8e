"""Seconds per 64x64 image at 20 steps on the bundled tiny model (the foundation issue's budget: 0.5 s).

    python bench/generate_speed.py [--threads N] [--repeats 5]

Reports the median over repeats of one image alone (batch 1, text encoding, 20 UNet steps with CFG, VAE decode),
and per image in a batch of 4. Print the machine with the numbers; the load on the machine matters.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sampler", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from sdtune.generate import GenerationParams, Generator

    gen = Generator("tiny")
    base = GenerationParams(prompt="a red circle on a white background", steps=20, cfg_scale=7.0, seed=1)
    if args.sampler:
        base = base.replace(sampler=args.sampler)
    gen.generate(base)  # warm-up
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for batch in (1, 4):
        times = []
        for r in range(args.repeats):
            t = time.perf_counter()
            gen.generate(base.replace(seed=r, batch_size=batch))
            times.append((time.perf_counter() - t) / batch)
        print(f"batch {batch}: median {statistics.median(times):.3f} s/image (min {min(times):.3f}, "
              f"max {max(times):.3f}) over {args.repeats} runs, sampler {gen.prepare(base).sampler}")


if __name__ == "__main__":
    main()
