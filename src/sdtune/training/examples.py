"""What one training step draws from a dataset item: the seeded augmentations (`Augment`), the example they make
(`make_example`: pixels or just flip + caption when latents are cached) and the batches of one epoch that share a
training size (`bucket_batches`). Every draw depends only on (seed, epoch, position), so a resumed run draws what
an uninterrupted one would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from sdtune.training import captions as cap
from sdtune.training import images as imgs

if TYPE_CHECKING:
    from sdtune.training.data import DatasetItem


@dataclass(frozen=True)
class Augment:
    """Seeded augmentations applied when an item becomes a training example. All off by default.

    crop: "center" or "random"; zoom: random extra scale range (>= 1) used with random crop; flip_p: chance of a
    horizontal flip (off by default: it mirrors text and asymmetric features); jitter/hue: colour jitter
    strength (brightness, contrast, saturation in [1-jitter, 1+jitter]; hue shift in turns); shuffle/keep_first:
    shuffle comma-separated tags keeping the first N; tag_dropout: chance of dropping each other tag;
    caption_dropout: chance the whole caption becomes "" (unconditional training)."""

    crop: str = "center"
    zoom: tuple[float, float] = (1.0, 1.0)
    flip_p: float = 0.0
    jitter: float = 0.0
    hue: float = 0.0
    shuffle: bool = False
    keep_first: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    @property
    def cacheable(self) -> bool:
        """True when the image side is fixed up to flips, so VAE latents can be encoded once (with flip variants)."""
        return self.crop == "center" and self.jitter == 0 and self.hue == 0


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG of one example: depends only on (seed, epoch, index), not on the order examples are drawn in."""
    return random.Random(f"{seed}:{epoch}:{index}")


@dataclass
class Example:
    pixels: torch.Tensor | None   # CHW float32 in [-1, 1]; None when only the caption/flip were drawn
    caption: str
    flipped: bool
    index: int


def make_example(item: DatasetItem, aug: Augment, rng: random.Random, *, index: int = -1,
                 with_pixels: bool = True) -> Example:
    """Draw one example from an item. The RNG is consumed in a fixed order (flip, crop, jitter, caption), so a
    given seed always gives the same example; with_pixels=False (cached latents) draws the same flip and caption
    without decoding the image."""
    flipped = aug.flip_p > 0 and rng.random() < aug.flip_p
    pixels = None
    img_rng = random.Random(rng.getrandbits(64))  # image randomness on its own stream: captions stay the same
    if with_pixels:
        img = item.load(crop=aug.crop, rng=img_rng, zoom=aug.zoom)
        if flipped:
            img = imgs.hflip(img)
        if aug.jitter > 0 or aug.hue > 0:
            img = imgs.colour_jitter(img, img_rng, brightness=aug.jitter, contrast=aug.jitter,
                                     saturation=aug.jitter, hue=aug.hue)
        pixels = imgs.to_tensor(img)
    caption = cap.augment_caption(item.caption, rng, shuffle=aug.shuffle, keep_first=aug.keep_first,
                                  tag_dropout=aug.tag_dropout, caption_dropout=aug.caption_dropout)
    return Example(pixels=pixels, caption=caption, flipped=flipped, index=index)


def bucket_batches(targets: Sequence[tuple[int, int]], order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split an epoch order into batches whose items share a training size (a batch must stack). Keeps the
    order's randomness: items go to their size's open batch in order; batches are emitted when full, leftovers
    at the end."""
    open_: dict[tuple[int, int], list[int]] = {}
    out: list[list[int]] = []
    for i in order:
        h, w = targets[i]
        b = open_.setdefault((h, w), [])
        b.append(i)
        if len(b) == batch_size:
            out.append(b)
            open_[(h, w)] = []
    out += [b for b in open_.values() if b]
    return out
