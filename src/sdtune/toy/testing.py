"""Helpers for tests: small toy-world datasets on disk."""

from __future__ import annotations

import random
from pathlib import Path

from sdtune.toy import world


def write_toy_dataset(folder: str | Path, n: int = 2, *, seed: int = 0, size: int = 64,
                      shapes: tuple[str, ...] = ("circle", "square"), caption: str = "a {colour} {shape}") -> Path:
    """n toy-world images (PNG) with .txt captions in `folder`."""
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
