"""Contact sheet of a run's images (PIL only; torchvision is not a dependency)."""

from __future__ import annotations

import math
from typing import Any, Sequence


def grid_shape(n: int) -> tuple[int, int]:
    """(columns, rows) for n images: as square as possible, wider rather than taller."""
    cols = math.ceil(math.sqrt(n))
    return cols, math.ceil(n / cols)


def make_grid(images: Sequence[Any], background: str = "black", cols: int | None = None) -> Any:
    """Paste images row by row into one PIL image; cells take the largest image's size. `cols` fixes the number
    of columns (default: as square as possible)."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    cols, rows = grid_shape(len(images)) if cols is None else (cols, math.ceil(len(images) / cols))
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (cols * w, rows * h), background)
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return sheet
