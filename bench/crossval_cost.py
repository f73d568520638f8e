"""What K-fold cross-validation (`--cv-folds K`) costs against one run with the same steps (not a test).

    OMP_NUM_THREADS=1 python bench/crossval_cost.py [--images 10] [--steps 100] [--every 25] [--folds 3,5]

All in one process, one after the other, on the bundled tiny model (LoRA rank 8, batch 4, 64 px, toy hearts):

* one run: `--steps` on the images with a single held-out split (`val_split` 1/K of the largest K), the usual way;
* K folds, shared latents: `cross_validate` (every image encoded by the VAE once for all folds);
* K folds, unshared (the largest K only): the same K fold runs, each encoding its own images, as K separate
  commands would.

Each is given a deep copy of the model loaded once (loading is not measured). Wall time (`time.perf_counter`) and
CPU time of this process (`time.process_time`) per variant, and the ratio to the one run; VAE images encoded.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--folds", default="3,5")
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    folds = [int(k) for k in args.folds.split(",")]

    import torch

    import sdtune.training.latents as latents
    from sdtune.models import load_model
    from sdtune.training import TrainConfig, Trainer, train
    from sdtune.training.crossval import cross_validate
    from sdtune.training.methods.lora import LoraOptions

    encoded = [0]
    real = latents.encode_latents

    def counting(vae: Any, images: Any, **kw: Any) -> Any:
        encoded[0] += len(images) * (2 if kw.get("flip_variants") else 1)
        return real(vae, images, **kw)

    latents.encode_latents = counting  # type: ignore[assignment]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="sdtune-cv-bench-"))
    try:
        data = hearts(work / "data", args.images)
        model = load_model(args.model, device="cpu")
        quiet = dict(echo=lambda s: None)

        def cfg(out: str, **kw: Any) -> Any:
            base = dict(method="lora", model=args.model, data=str(data), out=str(work / out), steps=args.steps,
                        save_every=args.every, lr=3e-3, batch_size=4, latents="sample", progress=False,
                        tensorboard=False, options=LoraOptions(rank=8, alpha=8, targets=["attn", "ff", "conv"]))
            base.update(kw)
            return TrainConfig(**base)

        def timed(name: str, fn: Callable[[], Any]) -> tuple[float, float]:
            encoded[0] = 0
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            rows.append((name, wall, cpu, encoded[0]))
            return wall, cpu

        rows: list[tuple[str, float, float, int]] = []
        split = round(1 / max(folds), 3)
        timed(f"one run (val_split {split})", lambda: train(cfg("one", val_split=split), model=copy.deepcopy(model),
                                                             **quiet))
        for k in folds:
            timed(f"{k} folds, shared latents", lambda: cross_validate(cfg(f"cv{k}", cv_folds=k), model=model,
                                                                       **quiet))
        k = max(folds)

        def unshared() -> None:
            for f in range(k):
                Trainer(cfg(f"un{k}/fold-{f}", cv_folds=k, cv_fold=f), model=copy.deepcopy(model), **quiet).run()

        timed(f"{k} folds, unshared latents", unshared)
        one_wall, one_cpu = rows[0][1], rows[0][2]
        print(f"LoRA rank 8, batch 4, {args.images} images, {args.steps} steps, checkpoint + validation every "
              f"{args.every}")
        print(f"{'variant':<34} {'wall s':>8} {'cpu s':>8} {'wall x':>7} {'cpu x':>7} {'VAE images':>11}")
        for name, wall, cpu, n in rows:
            print(f"{name:<34} {wall:>8.1f} {cpu:>8.1f} {wall / one_wall:>7.2f} {cpu / one_cpu:>7.2f} {n:>11}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def hearts(folder: Path, n: int) -> Path:
    import random

    from sdtune.toy import world
    from sdtune.toy.evaluate import write_dataset

    rng = random.Random(0)
    scenes = [world.random_scene(rng, shapes=("heart",), styles=("solid",)) for _ in range(n)]
    write_dataset(folder, scenes, [f"a {s.colour} sks shape on a {s.background} background" for s in scenes])
    return folder


if __name__ == "__main__":
    main()
