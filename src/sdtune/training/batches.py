"""Where the loop's batches come from: the dataset in epoch order, cached latents, SDXL size conditioning.

`BatchSource.next(step, generator)` gives the next micro-batch. The order is a pure function of (seed, epoch) and
the position in it is (`epoch`, `cursor`), which the state saves, so a resumed run draws exactly the batches an
uninterrupted one would. Latents are encoded once when the augmentations allow it (`Augment.cacheable`), else per
batch; `LatentEncoder` is the one place that runs the VAE for training (SDXL's VAE in fp32).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from sdtune.training.distributed import SINGLE, Ranks
from sdtune.training.methods.base import Batch

if TYPE_CHECKING:
    from sdtune.training.latents import CachedLatent, DiskLatents, LatentStore


def sdxl_time_ids(item: Any, crop: str) -> torch.Tensor:
    """SDXL's size conditioning: original (h, w), crop top-left, target (h, w). Random crops report (0, 0)."""
    from sdtune.training.images import cover_scale

    w, h = item.size
    tw, th = item.target
    top = left = 0
    if crop == "center":
        s = cover_scale((w, h), (tw, th))
        nw, nh = max(tw, round(w * s)), max(th, round(h * s))
        left, top = (nw - tw) // 2, (nh - th) // 2
    return torch.tensor([h, w, top, left, th, tw], dtype=torch.float32)


class LatentEncoder:
    """PIL images or dataset items -> `training.latents` cached latents, in chunks (bounded memory)."""

    def __init__(self, vae: Any, *, upcast_fp16: bool, store: LatentStore | None = None, model_key: str = "") -> None:
        self.vae = vae
        self.upcast_fp16 = upcast_fp16  # SDXL's VAE overflows in fp16: encode in fp32
        self.store = store  # latents shared with other runs in this process (cross-validation folds)
        self.model_key = model_key

    @contextlib.contextmanager
    def _vae(self) -> Iterator[Any]:
        dtype = next(self.vae.parameters()).dtype
        upcast = dtype == torch.float16 and self.upcast_fp16
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield self.vae
        finally:
            if upcast:
                self.vae.to(dtype)

    def encode(self, images: list[Any], flip_variants: bool = False) -> list[CachedLatent]:
        """PIL images, image tensors or dataset items (loaded centre-cropped) -> cached latents. With a `store`,
        dataset items it holds are not encoded again and new ones are added to it (other inputs, e.g. random crops,
        pass through)."""
        from sdtune.training.data import DatasetItem

        store = self.store
        if store is not None and images and all(isinstance(im, DatasetItem) for im in images):
            found = [store.get(self.model_key, it, flip_variants) for it in images]
            missing = [i for i, c in enumerate(found) if c is None]
            if missing:
                fresh = self._encode([images[i] for i in missing], flip_variants or store.flip)
                for i, c in zip(missing, fresh):
                    store.put(self.model_key, images[i], c)
                    found[i] = c
            return [c for c in found if c is not None]
        return self._encode(images, flip_variants)

    def _encode(self, images: list[Any], flip_variants: bool) -> list[CachedLatent]:
        from sdtune.training.data import DatasetItem
        from sdtune.training.latents import encode_latents

        out: list[CachedLatent] = []
        with self._vae() as vae:
            for start in range(0, len(images), 16):
                chunk = [im.load(crop="center") if isinstance(im, DatasetItem) else im
                         for im in images[start:start + 16]]
                out += encode_latents(vae, chunk, batch_size=4, flip_variants=flip_variants)
        return out


class BatchSource:
    """The training set as a stream of micro-batches (see the module docstring)."""

    def __init__(self, dataset: Any, aug: Any, encoder: LatentEncoder, *, seed: int, batch_size: int, buckets: bool,
                 crop: str, sample_latents: bool, is_sdxl: bool, device: torch.device,
                 ranks: Ranks = SINGLE, disk: Path | None = None) -> None:
        self.dataset, self.aug, self.encoder = dataset, aug, encoder
        self.ranks = ranks  # several processes: batch_size is the global batch, each rank trains its shard
        self.seed, self.batch_size, self.buckets, self.crop = seed, batch_size, buckets, crop
        self.sample_latents, self.is_sdxl, self.device = sample_latents, is_sdxl, device
        self.epoch = 0
        self.cursor = 0
        self.cached = aug.cacheable
        self.latent_cache: Sequence[CachedLatent] | DiskLatents | None = None
        self.disk = disk  # --latent-cache disk: the cache's folder (`training.latents.DiskLatents`)
        self._order: tuple[int, list[int], list[list[int]]] | None = None

    def encode_cache(self, echo: Callable[[str], None]) -> None:
        """Encode every training image once (with its flipped variant when flips are on), if the augmentations
        allow caching."""
        if self.cached and self.disk is not None:
            from sdtune.training.latents import DiskLatents

            flip = self.aug.flip_p > 0
            disk = DiskLatents(self.disk, len(self.dataset.items))
            with self.ranks.main_first():
                if disk.complete():
                    echo(f"latents: reusing the cache in {self.disk}")
                elif self.ranks.is_main:
                    t0 = time.time()
                    disk.build(lambda items: self.encoder.encode(items, flip_variants=flip), self.dataset.items)
                    echo(f"encoded {len(disk)} training image(s) to latents in {self.disk} in "
                         f"{time.time() - t0:.1f}s")
            self.latent_cache = disk
        elif self.cached:
            t0 = time.time()
            cache = None
            if self.ranks.is_main:  # encoded once, by the main process, and handed to the others
                cache = self.encoder.encode(list(self.dataset.items), flip_variants=self.aug.flip_p > 0)
            self.latent_cache = self.ranks.broadcast(cache)
            assert self.latent_cache is not None
            echo(f"encoded {len(self.latent_cache)} training image(s) to latents in {time.time() - t0:.1f}s")

    def seek(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        self._order = None

    def _epoch(self, epoch: int) -> tuple[list[int], list[list[int]]]:
        """(item order, batches of positions in that order) of one epoch."""
        from sdtune.training.examples import bucket_batches

        if self._order is None or self._order[0] != epoch:
            order = self.dataset.epoch_order(self.seed, epoch)
            bs = self.batch_size
            if self.buckets:
                targets = [self.dataset.items[i].target for i in order]
                batches = bucket_batches(targets, list(range(len(order))), bs)
            else:
                batches = [list(range(i, min(i + bs, len(order)))) for i in range(0, len(order), bs)]
            self._order = (epoch, order, batches)
        return self._order[1], self._order[2]

    @staticmethod
    def _skip_draws(gen: torch.Generator | None, like: Any, count: int) -> None:
        if gen is not None:
            for _ in range(count):
                torch.randn(like.mean.shape, generator=gen, dtype=like.mean.dtype)

    def next(self, step: int, gen: torch.Generator) -> Batch:
        from sdtune.training.examples import example_rng, make_example

        order, batches = self._epoch(self.epoch)
        if self.cursor >= len(batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            order, batches = self._epoch(self.epoch)
        positions = batches[self.cursor]
        self.cursor += 1
        n = len(positions)
        start, stop = self.ranks.shard(n)
        share = (stop - start) / n
        if start == stop:  # more processes than samples: train on one with weight 0 (every rank must step)
            start, stop = 0, 1
        items = self.dataset.items
        examples = [make_example(items[order[p]], self.aug, example_rng(self.seed, self.epoch, p),
                                 index=order[p], with_pixels=not self.cached) for p in positions[start:stop]]
        g = gen if self.sample_latents else None
        if self.latent_cache is not None:
            cached = [self.latent_cache[ex.index] for ex in examples]
            flips = [ex.flipped for ex in examples]
        else:
            cached = self.encoder.encode([ex.pixels for ex in examples])
            flips = [False] * len(examples)
        # The other ranks' rows draw their posterior samples from the same generator, before and after this rank's:
        # draw (and drop) theirs, so this rank's rows and the noise after them get what one process would draw.
        # The rows of a batch share one size.
        self._skip_draws(g, cached[0], start)
        lats = [c.get(f, generator=g) for c, f in zip(cached, flips)]
        self._skip_draws(g, cached[0], n - stop)
        time_ids = None
        if self.is_sdxl:
            time_ids = torch.stack([sdxl_time_ids(items[ex.index], self.crop) for ex in examples]).to(self.device)
        return Batch(latents=torch.stack(lats).to(self.device), captions=[ex.caption for ex in examples],
                     indices=[ex.index for ex in examples], flipped=[ex.flipped for ex in examples],
                     time_ids=time_ids, step=step, offset=start if share else 0, total=n, share=share)
