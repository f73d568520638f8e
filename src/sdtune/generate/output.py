"""Saving images A1111-style: `00000-<seed>.png` numbered after the highest number already in the folder, with the
infotext in the `parameters` chunk. Files are created exclusively, so nothing is ever overwritten, even when two
runs write to the same folder at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.generate.pnginfo import png_info

_NUMBERED = re.compile(r"^(\d+)-")
_GRID = re.compile(r"^grid-(\d+)")


def check_out_dir(folder: Path) -> None:
    """Fail before generating when the output folder cannot be one (it is a file)."""
    if folder.exists() and not folder.is_dir():
        raise SdtuneError(f"output folder {folder} is a file; pass a folder with --out")


def _next_number(folder: Path, pattern: re.Pattern[str]) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def _save_exclusive(image: Any, folder: Path, pattern: re.Pattern[str], name: str, infotext: str | None) -> Path:
    """Save under the first free number; `name` is a format string with {n}."""
    folder.mkdir(parents=True, exist_ok=True)
    n = _next_number(folder, pattern)
    while True:
        path = folder / name.format(n=n)
        try:
            fh = open(path, "xb")
        except FileExistsError:
            n += 1
            continue
        try:
            with fh:
                image.save(fh, format="PNG", pnginfo=png_info(infotext) if infotext else None)
        except BaseException:
            path.unlink(missing_ok=True)  # never leave a half-written file behind
            raise
        return path


def save_image(image: Any, folder: Path, seed: int, infotext: str | None) -> Path:
    """Save one image as `<NNNNN>-<seed>.png`."""
    return _save_exclusive(image, folder, _NUMBERED, f"{{n:05d}}-{seed}.png", infotext)


def save_grid(image: Any, folder: Path, infotext: str | None) -> Path:
    """Save a grid as `grid-<NNNN>.png` (its own numbering, so grids do not shift image numbers)."""
    return _save_exclusive(image, folder, _GRID, "grid-{n:04d}.png", infotext)
