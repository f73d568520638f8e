"""The training-data layer every trainer shares: read and validate a folder *before* training starts (what a step
draws from the items, with seeded augmentations: `training.examples`).

Folder layout (see README "Training data"):
* plain: images with optional sidecar captions `<stem>.txt` (or `.caption`) directly in the folder;
* kohya: subfolders named `<repeats>_<name>` (e.g. `10_sks dog`); their images are seen `repeats` times per epoch,
  and an image without a caption file gets the folder's `<name>` as caption. Top-level images count once.
  Other subfolders, and anything deeper, are skipped with a warning; hidden files and folders are ignored.

Problems that make training pointless or impossible raise `SdtuneError` with one line that says what to do;
everything else is collected in `Dataset.warnings`.
"""

from __future__ import annotations

import hashlib
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.paths import check_readable, read_bytes
from sdtune.training import captions as cap
from sdtune.training import images as imgs

KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")
SHOW = 5  # names listed in one warning before "and N more"


def name_list(names: Sequence[str], show: int = SHOW) -> str:
    names = list(names)
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return ", ".join(names[:show]) + more


# ------------------------------------------------------------------------------------------------- folder listing

@dataclass
class Listing:
    """What a folder holds: image files with their repeats and folder caption, and what was skipped."""

    images: list[tuple[Path, int, str]] = field(default_factory=list)  # (path, repeats, folder caption or "")
    other: list[Path] = field(default_factory=list)          # files that are neither images nor captions
    skipped_dirs: list[tuple[Path, int]] = field(default_factory=list)  # (dir, images inside)
    concept_dirs: list[tuple[Path, int]] = field(default_factory=list)  # (dir, repeats)
    caption_files: int = 0


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name not in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in imgs.IMAGE_EXTS


def check_folder(folder: str | Path) -> Path:
    """The folder as a Path, or a one-line error when it is missing or a file."""
    p = Path(folder).expanduser()
    if not p.exists():
        raise SdtuneError(f"dataset folder {p} does not exist; pass the folder that holds your training images")
    if not p.is_dir():
        raise SdtuneError(f"{p} is a file, not a folder; pass the folder that holds your training images")
    return check_readable(p, f"dataset folder {p}")


def list_images(folder: str | Path, exts: tuple[str, ...] = cap.CAPTION_EXTS,
                default_repeats: int = 1) -> tuple[Path, Listing]:
    """The folder and its image files, or a one-line error when it has none (nothing is decoded: cheap enough
    to run before a model loads, so an empty or wrong folder costs no loading time)."""
    root = check_folder(folder)
    listing = list_folder(root, exts, default_repeats)
    if not listing.images:
        found = found_instead(listing)
        if not found:
            raise SdtuneError(f"{root} is empty; put training images ({', '.join(imgs.IMAGE_EXTS)}) in it, each with "
                              "an optional <name>.txt caption")
        hint = ("; name subfolders <repeats>_<name> (e.g. 10_sks dog) to use them, or pass the subfolder itself"
                if listing.skipped_dirs else "")
        raise SdtuneError(f"no images in {root} (found {found}); supported: {', '.join(imgs.IMAGE_EXTS)}{hint}")
    return root, listing


def list_folder(folder: Path, caption_exts: tuple[str, ...] = cap.CAPTION_EXTS, default_repeats: int = 1) -> Listing:
    out = Listing()

    def files_of(d: Path, repeats: int, concept: str) -> None:
        for f in sorted(x for x in d.iterdir() if _visible(x) and x.is_file()):
            if f.suffix.lower() in imgs.IMAGE_EXTS:
                out.images.append((f, repeats, concept))
            elif f.suffix.lower() in caption_exts:
                out.caption_files += 1
            else:
                out.other.append(f)

    files_of(folder, default_repeats, "")
    for d in sorted(x for x in folder.iterdir() if _visible(x) and x.is_dir()):
        m = KOHYA_DIR.match(d.name)
        if m and int(m.group(1)) > 0:
            out.concept_dirs.append((d, int(m.group(1))))
            check_readable(d, f"dataset folder {d}")
            files_of(d, int(m.group(1)), m.group(2).strip())
        else:
            out.skipped_dirs.append((d, sum(1 for f in d.rglob("*") if _is_image(f))))
    return out


def found_instead(listing: Listing) -> str:
    parts = []
    exts = Counter(f.suffix.lower() or "(no extension)" for f in listing.other)
    parts += [f"{n} {e}" for e, n in exts.most_common()]
    if listing.caption_files:
        parts.append(f"{listing.caption_files} caption files")
    for d, n in listing.skipped_dirs:
        parts.append(f"folder {d.name!r} with {n} images")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- probing

@dataclass
class Probe:
    """One image file read once: its facts, caption and bytes' hash, or why it cannot be read."""

    path: Path
    rel: str
    repeats: int
    sha256: str
    size: tuple[int, int] = (0, 0)     # after EXIF rotation
    mode: str = ""
    exif_rotated: bool = False
    alpha: bool = False
    error: str | None = None
    caption: str = ""
    caption_file: Path | None = None
    caption_source: str = "none"       # "file", "folder" or "none"
    caption_problem: str | None = None


def probe_file(path: Path, folder: Path, repeats: int, concept: str, caption_exts: tuple[str, ...],
               *, draft: int | None = None) -> tuple[Probe, Image.Image | None]:
    """Read one image fully (so truncated files are caught now) plus its caption; returns the RGB image too."""
    data = read_bytes(path)
    pr = Probe(path=path, rel=path.relative_to(folder).as_posix(), repeats=repeats,
               sha256=hashlib.sha256(data).hexdigest())
    rgb = None
    try:
        rgb, facts = imgs.open_image(data, draft=draft)
        pr.size, pr.mode = facts["size"], facts["mode"]
        pr.exif_rotated, pr.alpha = facts["exif_rotated"], facts["alpha"]
    except imgs.DECODE_ERRORS as exc:
        pr.error = imgs.describe_error(exc)
    cf = cap.find_caption(path, caption_exts)
    if cf is not None:
        pr.caption_file = cf
        pr.caption, pr.caption_problem = cap.decode_caption(read_bytes(cf))
        pr.caption_source = "file" if pr.caption else "none"
    if not pr.caption and concept:
        pr.caption, pr.caption_source = concept, "folder"
    return pr, rgb


# ---------------------------------------------------------------------------------------------------- dataset

@dataclass
class DatasetItem:
    """One training image: where it is, its caption and repeats, and the size it trains at."""

    path: Path
    rel: str
    caption: str
    repeats: int
    size: tuple[int, int]          # original (after EXIF rotation)
    target: tuple[int, int]        # training size (w, h): (resolution, resolution) or its bucket
    mode: str
    sha256: str
    caption_source: str = "file"

    def load(self, *, crop: str = "center", rng: random.Random | None = None,
             zoom: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
        """The image as RGB at `target` size (decoded now; nothing is kept in memory)."""
        try:
            rgb, _ = imgs.open_image(self.path, draft=max(self.target))
        except FileNotFoundError:
            raise SdtuneError(f"{self.path} disappeared during training; put it back or re-scan the dataset") from None
        except imgs.DECODE_ERRORS as exc:
            raise SdtuneError(f"{self.path} can no longer be read ({imgs.describe_error(exc)}); it was readable when "
                              "the dataset was scanned: was it changed?") from None
        return imgs.fit_image(rgb, self.target, crop=crop, rng=rng, zoom=zoom)


@dataclass
class Dataset:
    folder: Path
    resolution: int
    items: list[DatasetItem]
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason) of unreadable images

    def __len__(self) -> int:
        return len(self.items)

    @property
    def images_per_epoch(self) -> int:
        """Images seen per epoch, counting repeats."""
        return sum(it.repeats for it in self.items)

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """Item indices for one epoch: each index `repeats` times, shuffled deterministically by (seed, epoch)."""
        order = [i for i, it in enumerate(self.items) for _ in range(it.repeats)]
        random.Random(f"{seed}:{epoch}").shuffle(order)
        return order

    def fingerprint(self) -> str:
        """sha256 over every item's relative path, file bytes (their sha256), caption and repeats, in path order.
        Stable across machines and runs; changes when any image, caption or repeat count changes."""
        h = hashlib.sha256(b"sdtune-dataset-v1\n")
        for it in sorted(self.items, key=lambda i: i.rel):
            h.update(f"{it.rel}\0{it.sha256}\0{it.caption}\0{it.repeats}\n".encode())
        return h.hexdigest()

    def metadata(self) -> dict[str, str]:
        """Facts about the data for a trained file's metadata (safetensors string values)."""
        return {"sdtune_dataset_hash": self.fingerprint(), "sdtune_dataset_images": str(len(self.items)),
                "sdtune_dataset_images_per_epoch": str(self.images_per_epoch),
                "sdtune_resolution": str(self.resolution)}


def scan_dataset(folder: str | Path, *, resolution: int, min_images: int = 1,
                 caption_ext: str | Sequence[str] = cap.CAPTION_EXTS, skip_bad: bool = False, buckets: bool = False,
                 bucket_step: int = 64, max_ratio: float = 2.0, default_repeats: int = 1) -> Dataset:
    """Read and validate a training folder; every image is decoded once now so that no bad file surfaces mid-run.

    Errors (SdtuneError): missing folder, not a folder, empty, no images, fewer than `min_images` readable
    images, unreadable images (unless `skip_bad`, which skips them with a warning).
    Warnings: a single image, skipped files/folders, missing/empty captions, captions that are not UTF-8,
    images smaller than the training size (upscaled), identical files, EXIF-rotated, transparent and 16-bit
    images (converted as described in `training.images`).
    With `buckets`, each image trains at the aspect-ratio bucket (multiples of `bucket_step`, area about
    resolution**2) nearest its own aspect ratio instead of a centre-cropped square."""
    if resolution < 8:
        raise SdtuneError(f"resolution {resolution} is too small; use the model's size (512 for SD1, 768 for SD2-v, "
                          "1024 for SDXL, 64 for tiny)")
    exts = (caption_ext,) if isinstance(caption_ext, str) else tuple(caption_ext)
    exts = tuple(e if e.startswith(".") else "." + e for e in exts)
    root, listing = list_images(folder, exts, default_repeats)

    bucket_list = imgs.make_buckets(resolution, step=bucket_step, max_ratio=max_ratio) if buckets else []
    if buckets and not bucket_list:
        raise SdtuneError(f"no aspect-ratio buckets fit resolution {resolution} with step {bucket_step}; use a "
                          "resolution that is a multiple of the step")
    warnings: list[str] = []
    items: list[DatasetItem] = []
    bad: list[tuple[str, str]] = []
    probes: list[Probe] = []
    for path, repeats, concept in listing.images:
        pr, _ = probe_file(path, root, repeats, concept, exts, draft=resolution * 2)
        probes.append(pr)
        if pr.error:
            bad.append((pr.rel, pr.error))
            continue
        target = imgs.nearest_bucket(pr.size, bucket_list) if buckets else (resolution, resolution)
        items.append(DatasetItem(path=path, rel=pr.rel, caption=pr.caption, repeats=repeats, size=pr.size,
                                 target=target, mode=pr.mode, sha256=pr.sha256, caption_source=pr.caption_source))

    if bad:
        listed = name_list([f"{r} ({why})" for r, why in bad])
        if not skip_bad:
            raise SdtuneError(f"{len(bad)} unreadable image(s): {listed}; fix or remove them, or skip them with "
                              "--skip-bad")
        warnings.append(f"skipped {len(bad)} unreadable image(s): {listed}")
    if len(items) < max(1, min_images):
        what = "no readable images" if not items else f"only {len(items)} readable image(s)"
        raise SdtuneError(f"{what} in {root}; at least {max(1, min_images)} needed: add images")
    if len(items) == 1:
        warnings.append("only 1 image: training works, but the result will copy that one picture; 3 or more "
                        "varied images generalise much better")

    if listing.other:
        warnings.append(f"ignored {len(listing.other)} file(s) that are not images: "
                        f"{name_list([f.relative_to(root).as_posix() for f in listing.other])}")
    for d, n in listing.skipped_dirs:
        if n:
            warnings.append(f"skipped folder {d.name!r} ({n} images): name it <repeats>_<name> (e.g. 1_{d.name}) "
                            "to train on it")
    missing = [p.rel for p in probes if not p.error and p.caption_file is None and p.caption_source == "none"]
    empty = [p.rel for p in probes if not p.error and p.caption_file is not None and p.caption_source == "none"]
    if missing:
        warnings.append(f"{len(missing)} of {len(items)} images have no caption file ({'/'.join(exts)}): "
                        f"{name_list(missing)}")
    if empty:
        warnings.append(f"{len(empty)} caption file(s) are empty: {name_list(empty)}")
    named = [p.rel for p in probes if not p.error and p.caption_source == "folder"]
    if named:
        warnings.append(f"{len(named)} image(s) without a caption use their folder's name as caption: "
                        f"{name_list(named)}")
    enc = [p.caption_file.name for p in probes if p.caption_problem and p.caption_file]
    if enc:
        warnings.append(f"{len(enc)} caption file(s) are not UTF-8 (read as Latin-1; re-save as UTF-8): "
                        f"{name_list(enc)}")
    small = [f"{it.rel} ({it.size[0]}x{it.size[1]})" for it in items if imgs.cover_scale(it.size, it.target) > 1]
    if small:
        warnings.append(f"{len(small)} image(s) are smaller than the training size {resolution} and will be "
                        f"upscaled (softer): {name_list(small)}")
    by_hash: dict[str, list[str]] = {}
    for it in items:
        by_hash.setdefault(it.sha256, []).append(it.rel)
    dups = [" = ".join(g) for g in by_hash.values() if len(g) > 1]
    if dups:
        warnings.append(f"{len(dups)} group(s) of identical files (they count extra): {name_list(dups)}")
    rot = [p.rel for p in probes if not p.error and p.exif_rotated]
    if rot:
        warnings.append(f"{len(rot)} image(s) rotated upright from their EXIF orientation: {name_list(rot)}")
    alpha = [p.rel for p in probes if not p.error and p.alpha]
    if alpha:
        warnings.append(f"{len(alpha)} image(s) with transparency composited on white: {name_list(alpha)}")
    deep = [p.rel for p in probes if not p.error and p.mode.startswith(("I", "F"))]
    if deep:
        warnings.append(f"{len(deep)} 16/32-bit image(s) scaled to 8 bits: {name_list(deep)}")
    return Dataset(folder=root, resolution=resolution, items=items, warnings=warnings, skipped=bad)


def size_summary(sizes: Sequence[tuple[int, int]]) -> dict[str, list[int]]:
    """min/median/max of widths and heights."""
    ws, hs = [s[0] for s in sizes], [s[1] for s in sizes]
    return {"width": [min(ws), int(statistics.median(ws)), max(ws)],
            "height": [min(hs), int(statistics.median(hs)), max(hs)]}
