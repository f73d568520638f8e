"""Measure a model on the toy world with the judge: the figures every claim in this project rests on."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from sdtune.toy import world
from sdtune.toy.judge import agreement, judge

ATTRIBUTES = ("colour", "shape", "background", "style")


def base_prompts(shapes: Iterable[str] = world.KNOWN_SHAPES) -> list[tuple[str, world.Scene]]:
    """Every base prompt "a {colour} {shape} on a {background} background" with the scene it asks for."""
    out = []
    for shape, colour, bg in itertools.product(shapes, world.COLOURS, world.BACKGROUNDS):
        scene = world.Scene(shape, colour, bg)
        out.append((scene.caption(), scene))
    return out


@dataclass
class EvalReport:
    """Agreement rates per attribute, per-image records, and generation speed."""

    rates: dict[str, float]
    n_images: int
    seconds_per_image: float
    records: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        rates = ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.rates.items())
        return f"{self.n_images} images: {rates}; {self.seconds_per_image:.3f} s/image"


def evaluate(generator, prompts: list[tuple[str, world.Scene]], *, seeds: int = 4, steps: int = 20,
             cfg_scale: float = 7.0, sampler: str | None = None, negative_prompt: str = "",
             progress: Callable[[int, int], None] | None = None, keep_images: bool = False) -> EvalReport:
    """Generate `seeds` images per prompt (seeds 0..seeds-1, one batch per prompt) and judge each one."""
    from sdtune.generate import GenerationParams

    counts = {a: 0 for a in ATTRIBUTES}
    records: list[dict] = []
    start = time.perf_counter()
    for i, (prompt, scene) in enumerate(prompts):
        params = GenerationParams(prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale,
                                  seed=0, batch_size=seeds, batch_count=1)
        if sampler:
            params = params.replace(sampler=sampler)
        for img in generator.generate(params):
            verdict = judge(img.image)
            found = agreement(verdict, scene)
            for a in ATTRIBUTES:
                counts[a] += found[a]
            rec = {"prompt": prompt, "seed": img.seed, **{f"ok_{k}": v for k, v in found.items()},
                   **verdict.as_dict()}
            if keep_images:
                rec["image"] = img.image
            records.append(rec)
        if progress:
            progress(i + 1, len(prompts))
    elapsed = time.perf_counter() - start
    n = len(records)
    return EvalReport({a: counts[a] / max(n, 1) for a in ATTRIBUTES}, n, elapsed / max(n, 1), records)


def vae_round_trip(vae, images: list) -> list:
    """Images encoded (posterior mean) and decoded by `vae`: what a model built on that VAE can draw at best, so
    the judge's reading of them is a ceiling for anything trained on it."""
    import torch

    from sdtune.training.images import to_image, to_tensor

    x = torch.stack([to_tensor(im) for im in images]).to(vae.device, vae.dtype)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return [to_image(t) for t in y]


def write_dataset(folder, scenes: list[world.Scene], captions: list[str]) -> list:
    """Write rendered scenes as PNGs with `.txt` caption sidecars (the layout every trainer here reads)."""
    from pathlib import Path

    from sdtune.atomic import atomic_path, write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (scene, caption) in enumerate(zip(scenes, captions)):
        path = folder / f"{i:04d}.png"
        with atomic_path(path) as tmp:  # a full disk: one line, no partial PNG, the pairs written before kept
            world.render(scene).save(tmp, format="PNG")
        try:
            write_atomic(path.with_suffix(".txt"), caption + "\n")
        except BaseException:
            path.unlink(missing_ok=True)  # an image without its caption would train on no caption
            raise
        paths.append(path)
    return paths
