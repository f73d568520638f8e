"""Helpers for tests of the training loop: tiny models wrapped as `LoadedModel` and small toy datasets."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch


def tiny_loaded(family: str = "sd1", seed: int = 0) -> Any:
    """A `LoadedModel` around `models.testing.tiny_pipeline(family)` (random weights, CPU, fp32)."""
    from sdtune.models.loading import LoadedModel
    from sdtune.models.testing import tiny_pipeline

    pipe = tiny_pipeline(family, seed)
    pred = pipe.scheduler.config.get("prediction_type", "epsilon")
    return LoadedModel(pipe=pipe, family=family, prediction_type=pred, name=f"tiny-{family}", hash="0" * 10,
                       source=Path(f"<tiny-{family}>"), device=torch.device("cpu"), dtype=torch.float32)


def write_toy_dataset(folder: str | Path, n: int = 2, *, seed: int = 0, size: int = 64,
                      shapes: tuple[str, ...] = ("circle", "square"), caption: str = "a {colour} {shape}") -> Path:
    """n toy-world images (PNG) with .txt captions in `folder`."""
    from sdtune.toy import world

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        scene = world.random_scene(rng, shapes=shapes)
        img = world.render(scene)
        if img.size != (size, size):
            img = img.resize((size, size))
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption.format(colour=scene.colour, shape=scene.shape),
                                             encoding="utf-8")
    return folder
