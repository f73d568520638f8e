"""Saving images A1111-style: `00000-<seed>.png` numbered after the highest number already in the folder, with the
infotext in the `parameters` chunk. Files are written whole and then named exclusively, so nothing is ever
overwritten, even when two runs write to the same folder at once, and no partial image is left behind."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from sdtune.atomic import FILE_MODE
from sdtune.errors import SdtuneError
from sdtune.generate.pnginfo import png_info
from sdtune.paths import check_name, check_writable_dir, writing

_NUMBERED = re.compile(r"^(\d+)-")
_GRID = re.compile(r"^grid-(\d+)")


def check_out_dir(folder: Path) -> None:
    """Fail before generating when the output folder cannot be one (it is a file, or not writable)."""
    check_name(folder, f"output folder {folder}")
    if folder.exists() and not folder.is_dir():
        raise SdtuneError(f"output folder {folder} is a file; pass a folder with --out")
    check_writable_dir(folder, "output folder")


def _next_number(folder: Path, pattern: re.Pattern[str]) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Give the complete file `tmp` the name `path` unless that name exists (FileExistsError then).

    A hard link is atomic and exclusive; where the file system has none, the name is reserved with an empty
    exclusive file and the complete file replaces it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        with open(path, "xb"):
            pass
        os.replace(tmp, path)


def _save_exclusive(image: Any, folder: Path, pattern: re.Pattern[str], name: str, infotext: str | None) -> Path:
    """Save under the first free number; `name` is a format string with {n}.

    The PNG is written to a temp file first, so a full disk leaves no partial image (one line; the images saved
    before it are kept), then linked to the first free name, so two runs sharing a folder never overwrite."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".sdtune-", suffix=".tmp.png", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            image.save(tmp, format="PNG", pnginfo=png_info(infotext) if infotext else None)
            os.chmod(tmp, FILE_MODE)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            n = _next_number(folder, pattern)
            while True:
                path = folder / name.format(n=n)
                try:
                    _link_exclusive(tmp, path)
                except FileExistsError:
                    n += 1
                    continue
                return path
        finally:
            tmp.unlink(missing_ok=True)


def save_image(image: Any, folder: Path, seed: int, infotext: str | None) -> Path:
    """Save one image as `<NNNNN>-<seed>.png`."""
    return _save_exclusive(image, folder, _NUMBERED, f"{{n:05d}}-{seed}.png", infotext)


def save_grid(image: Any, folder: Path, infotext: str | None) -> Path:
    """Save a grid as `grid-<NNNN>.png` (its own numbering, so grids do not shift image numbers)."""
    return _save_exclusive(image, folder, _GRID, "grid-{n:04d}.png", infotext)
