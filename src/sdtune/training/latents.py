"""Latent cache: encode each training image (and, optionally, its mirror image) with the VAE once, before training.

The cache keeps the VAE's posterior mean *and* standard deviation, already shifted and scaled into the UNet's
latent space (`(z - shift_factor) * scaling_factor`), so a trainer can either use the mean (deterministic) or draw
a fresh sample every step (`get(generator=...)`), which is what encoding on the fly would do, at no extra VAE cost.
Caching requires a fixed image side (centre crop, no colour jitter): see `examples.Augment.cacheable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from sdtune.training.images import to_tensor


@dataclass
class CachedLatent:
    mean: torch.Tensor                      # (C, h, w) float32 on CPU, shifted and scaled
    std: torch.Tensor
    flip_mean: torch.Tensor | None = None   # the horizontally flipped image's, when flip variants were encoded
    flip_std: torch.Tensor | None = None

    def get(self, flipped: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent to train on: the mean, or a sample from the posterior when a generator is given."""
        mean, std = (self.flip_mean, self.flip_std) if flipped else (self.mean, self.std)
        if mean is None:
            raise ValueError("this cache has no flipped variants; encode with flip_variants=True")
        if generator is None:
            return mean
        assert std is not None  # encoded together with the mean
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def latent_scaling(vae: Any) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE's config (shift 0 when unset, as for SD1/SD2/SDXL)."""
    cfg = vae.config
    scale = getattr(cfg, "scaling_factor", None)
    shift = getattr(cfg, "shift_factor", None)
    return (0.18215 if scale is None else float(scale)), (0.0 if shift is None else float(shift))


@torch.no_grad()
def encode_latents(vae: Any, images: Sequence[Image.Image | torch.Tensor], *, batch_size: int = 4,
                   flip_variants: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> list[CachedLatent]:
    """Encode every image once (and its mirror once when `flip_variants`), in batches of same-sized images.

    images: PIL images at training size or CHW tensors in [-1, 1]. Returns one CachedLatent per image, in order.
    Runs on the VAE's device and dtype; results are float32 on the CPU."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    scale, shift = latent_scaling(vae)
    param = next(vae.parameters())
    device, dtype = param.device, param.dtype
    tensors = [im if isinstance(im, torch.Tensor) else to_tensor(im) for im in images]
    # Jobs: (image index, flipped); grouped by size so every batch stacks.
    jobs = [(i, f) for i in range(len(tensors)) for f in ((False, True) if flip_variants else (False,))]
    by_shape: dict[tuple[int, ...], list[tuple[int, bool]]] = {}
    for job in jobs:
        by_shape.setdefault(tuple(tensors[job[0]].shape), []).append(job)
    means: dict[tuple[int, bool], torch.Tensor] = {}
    stds: dict[tuple[int, bool], torch.Tensor] = {}
    done = 0
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            x = torch.stack([tensors[i].flip(-1) if f else tensors[i] for i, f in chunk])
            dist = vae.encode(x.to(device=device, dtype=dtype)).latent_dist
            m = ((dist.mean.float() - shift) * scale).cpu()
            s = (dist.std.float() * scale).cpu()
            for k, job in enumerate(chunk):
                means[job], stds[job] = m[k].clone(), s[k].clone()
            done += len(chunk)
            if progress:
                progress(done, len(jobs))
    return [CachedLatent(means[(i, False)], stds[(i, False)],
                         means.get((i, True)), stds.get((i, True))) for i in range(len(tensors))]


def resolve_latents_mode(mode: str, model: Any) -> str:
    """`auto` -> the latents the model was trained on: its folder's `sdtune.json` may say {"latents": "mean"}
    (the bundled tiny model does: training on posterior samples adds noise it never saw, and a LoRA then learns
    that noise for every prompt); else "sample", what SD models were trained on."""
    if mode != "auto":
        return mode
    import json
    from pathlib import Path

    marker = Path(str(getattr(model, "source", ""))) / "sdtune.json"
    try:
        declared = json.loads(marker.read_text(encoding="utf-8")).get("latents") if marker.is_file() else None
    except (OSError, ValueError, AttributeError):
        declared = None
    return declared if declared in ("sample", "mean") else "sample"


class DiskLatents:
    """The latent cache in files (`--latent-cache disk`), for datasets whose latents do not fit in RAM: one
    safetensors file per image in `folder`, read when a batch needs it (the OS page cache keeps what fits).

    `folder` is named by a key over the items (path, content hash, training size, in order), the flip variants
    and the model, so a rerun or a resumed run reuses it and any change encodes anew. Encoded in chunks, so memory
    stays bounded while building; the main process builds it and the others wait (`training.distributed`)."""

    CHUNK = 64

    def __init__(self, folder: Any, count: int) -> None:
        from pathlib import Path

        self.folder = Path(folder)
        self.count = count

    def __len__(self) -> int:
        return self.count

    def _path(self, i: int) -> Any:
        return self.folder / f"{i:06d}.safetensors"

    def __getitem__(self, i: int) -> CachedLatent:
        from safetensors.torch import load_file

        t = load_file(self._path(i))
        return CachedLatent(t["mean"], t["std"], t.get("flip_mean"), t.get("flip_std"))

    def complete(self) -> bool:
        return (self.folder / "done").is_file() and all(self._path(i).is_file() for i in range(self.count))

    def build(self, encode: Callable[[list[Any]], list[CachedLatent]], items: Sequence[Any]) -> None:
        """Encode `items` chunk by chunk with `encode` and write each latent atomically; `done` marks the end."""
        from safetensors.torch import save_file

        from sdtune.atomic import atomic_path, write_atomic

        self.folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(items), self.CHUNK):
            for k, c in enumerate(encode(list(items[start:start + self.CHUNK]))):
                tensors = {"mean": c.mean, "std": c.std}
                if c.flip_mean is not None and c.flip_std is not None:
                    tensors.update(flip_mean=c.flip_mean, flip_std=c.flip_std)
                with atomic_path(self._path(start + k)) as tmp:
                    save_file({n: v.contiguous() for n, v in tensors.items()}, str(tmp))
        write_atomic(self.folder / "done", "")


def disk_cache_key(items: Sequence[Any], flip: bool, model_hash: str, resolution: int) -> str:
    """The name of a `DiskLatents` folder (see there)."""
    import hashlib

    h = hashlib.sha256(f"sdtune-latents-v1\0{model_hash}\0{resolution}\0{flip}\n".encode())
    for it in items:
        h.update(f"{it.rel}\0{it.sha256}\0{tuple(it.target)}\n".encode())
    return h.hexdigest()[:16]


class LatentStore:
    """Latents of dataset items shared by several runs in one process: the folds of a cross-validation
    (`training.crossval`) train and validate on the same images, so each is encoded once for all of them.

    An entry is keyed by the model (`model_key`: hash, training size, VAE) and the item's content and training size
    (sha256, target), not its path or position, so every fold finds it whatever split it makes. `flip`: encode the
    mirror images too (when the runs flip), so an image first needed for validation (no flips) serves training later.
    `encoded` counts the images the VAE encoded through the store (the tests and the benchmark read it)."""

    def __init__(self, *, flip: bool = False) -> None:
        self.flip = flip
        self.encoded = 0
        self._entries: dict[tuple[str, str, tuple[int, ...]], CachedLatent] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(model_key: str, item: Any) -> tuple[str, str, tuple[int, ...]]:
        return model_key, str(item.sha256), tuple(item.target)

    def get(self, model_key: str, item: Any, flip_variants: bool = False) -> CachedLatent | None:
        c = self._entries.get(self._key(model_key, item))
        if c is None or (flip_variants and c.flip_mean is None):
            return None
        return c

    def put(self, model_key: str, item: Any, latent: CachedLatent) -> None:
        self._entries[self._key(model_key, item)] = latent
        self.encoded += 1
