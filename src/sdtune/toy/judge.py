"""The judge: reads a toy-world image back into (colour, shape, background, style) with confidences.

Deterministic and weight-free: every decision compares the image against the world's own palette and
renderer. Background = palette colour nearest the median border pixel; foreground = pixels far from it;
colour = majority vote of foreground pixels over the palette (each colour with its stripe shade);
shape = best IoU of the hole-filled, bounding-box-normalised silhouette against rendered templates;
style = noise first (then the shape is read through a median filter), outline (hollow), stripes (row-periodic
shade), blur (a wide soft edge). Degraded images are read for colour, background and their degradation; their
shape is reported but not guaranteed (blur and noise destroy the very features that tell a star from a diamond).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sdtune.toy import world

NORM = 24  # side of the normalised silhouette


@dataclass(frozen=True)
class Verdict:
    colour: str
    shape: str
    background: str
    style: str
    colour_conf: float
    shape_conf: float
    background_conf: float
    style_conf: float
    foreground_fraction: float
    hollow: float = 0.0  # share of the shape's inner area left background-coloured: ~0 solid, ~1 outline
    blur: float = 0.0  # soft-edge band around the shape per perimeter pixel: solid <= ~2.9, blurry >= 3

    def as_dict(self) -> dict:
        return asdict(self)


def _normalise(mask: np.ndarray) -> np.ndarray | None:
    """Crop a boolean mask to its bounding box and resample to NORM x NORM floats (None when empty)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 12:
        return None
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((NORM, NORM), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def _templates() -> tuple[tuple[str, ...], np.ndarray]:
    names, arrs = [], []
    for shape in world.SHAPES:
        for r in (14.0, 16.5, 19.0):
            m = np.asarray(world.shape_mask(shape, 32.0, 32.0, r), dtype=np.float32) > 127
            names.append(shape)
            norm = _normalise(m)
            assert norm is not None  # the renderer's masks at these radii are never (nearly) empty
            arrs.append(norm)
    return tuple(names), np.stack(arrs)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Everything not reachable from the border through background pixels."""
    padded = np.pad(mask, 1).astype(np.uint8) * 255
    im = Image.fromarray(padded).copy()  # Pillow 13: fromarray gives a read-only view; floodfill would no-op
    ImageDraw.floodfill(im, (0, 0), 128)
    outside = np.asarray(im) == 128
    return ~outside[1:-1, 1:-1]


def _despeckle(mask: np.ndarray) -> np.ndarray:
    """Drop pixels with fewer than 3 set neighbours (specks in generated images); keeps thin outlines."""
    p = np.pad(mask, 1).astype(np.int8)
    h, w = mask.shape
    neighbours = sum(p[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - mask
    return mask & (neighbours >= 3)


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.filter(ImageFilter.MinFilter(2 * px + 1))) > 127


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.filter(ImageFilter.MaxFilter(2 * px + 1))) > 127


def judge(image: Image.Image) -> Verdict:
    """Read one generated (or rendered) toy-world image."""
    pil = image.convert("RGB").resize((world.SIZE, world.SIZE), Image.Resampling.BILINEAR)
    img = np.asarray(pil, dtype=np.float32)
    border = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3), img[:, -3:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg_names = list(world.BACKGROUNDS)
    bg_pal = np.array([world.BACKGROUNDS[n] for n in bg_names], dtype=np.float32)
    d_bg = np.linalg.norm(bg_pal - bg_rgb, axis=1)
    order = np.argsort(d_bg)
    background = bg_names[order[0]]
    background_conf = float(np.clip((d_bg[order[1]] - d_bg[order[0]]) / (d_bg[order[1]] + 1e-6), 0, 1))

    # Noise shows as spread of the border pixels; read the shape through a median filter then.
    border_spread = float(np.median(np.abs(border - bg_rgb).sum(axis=1)))
    noisy = border_spread > 30.0
    if noisy:
        img = np.asarray(pil.filter(ImageFilter.MedianFilter(5)), dtype=np.float32)
        bg_rgb = np.median(np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3)]), axis=0)

    # Classify every pixel against the palette: background, the 5 colours, their 5 stripe shades.
    names = list(world.COLOURS)
    pal = np.array([bg_rgb] + [world.COLOURS[n] for n in names] + [world.shade(world.COLOURS[n]) for n in names], dtype=np.float32)
    label = np.argmin(((img[:, :, None, :] - pal[None, None]) ** 2).sum(-1), axis=2)
    fg = _despeckle(label > 0)
    filled = _fill_holes(fg)
    fg_frac = float(filled.mean())
    if fg.sum() < 12:
        return Verdict("none", "none", background, "none", 0.0, 0.0, background_conf, 0.0, fg_frac)

    fg_labels = label[fg]
    fg_labels = fg_labels[fg_labels > 0]
    votes = np.bincount((fg_labels - 1) % len(names), minlength=len(names))
    colour = names[int(votes.argmax())]
    colour_conf = float(votes.max() / max(votes.sum(), 1))

    # Shape: IoU of the normalised silhouette against the renderer's templates.
    sil = _normalise(filled)
    assert sil is not None  # filled covers fg, which has >= 12 pixels here
    tnames, tarr = _templates()
    iou = np.minimum(tarr, sil).sum(axis=(1, 2)) / np.maximum(np.maximum(tarr, sil).sum(axis=(1, 2)), 1e-6)
    best_per_shape = {n: 0.0 for n in world.SHAPES}
    for n, v in zip(tnames, iou):
        best_per_shape[n] = max(best_per_shape[n], float(v))
    ranked = sorted(best_per_shape.items(), key=lambda kv: -kv[1])
    shape = ranked[0][0]
    shape_conf = float(np.clip(ranked[0][1] - ranked[1][1] + 0.5 * ranked[0][1], 0, 1))

    # Style: noisy, outline (empty interior), striped (rows alternate between colour and shade),
    # blurry (a wide band of soft edge), else solid.
    dist = np.linalg.norm(img - bg_rgb, axis=2)
    level = float(np.percentile(dist[fg], 90))
    perimeter = max(int((filled & ~_erode(filled, 1)).sum()), 1)
    soft_band = _dilate(filled, 6) & (dist > 0.12 * level) & (dist < 0.7 * level)
    blur_ratio = float(soft_band.sum() / perimeter)
    fill_ratio = float(fg.sum() / max(filled.sum(), 1))
    interior = _erode(filled, world.OUTLINE_WIDTH + 1)
    hollow = float(1.0 - fg[interior].mean()) if interior.sum() >= 3 else 0.0
    is_shade = label > len(names)
    fg_rows = np.nonzero(fg)[0]
    per_row = np.bincount(fg_rows, minlength=world.SIZE)
    shade_per_row = np.bincount(fg_rows, weights=is_shade[fg].astype(np.float64), minlength=world.SIZE)
    shade_rows = (shade_per_row / np.maximum(per_row, 1))[per_row > 0]
    shade_frac = float(is_shade[fg].mean())
    if noisy:
        style, style_conf = "noisy", min(1.0, border_spread / 90.0)
    elif hollow > 0.5 or fill_ratio < 0.75:
        style, style_conf = "outline", max(hollow, 1.0 - fill_ratio)
    elif 0.2 < shade_frac < 0.8 and np.abs(np.diff((shade_rows > 0.5).astype(int))).sum() >= 5:
        style, style_conf = "striped", 1.0 - abs(shade_frac - 0.5)
    elif blur_ratio > 3.0:  # calibrated on VAE-decoded images: solid <= 2.9, blurry >= 3.0 (5th-95th pct)
        style, style_conf = "blurry", min(1.0, blur_ratio / 6.0)
    else:
        style, style_conf = "solid", 1.0 - min(shade_frac, 1.0)
    return Verdict(colour, shape, background, style, colour_conf, shape_conf, background_conf, float(style_conf), fg_frac,
                   hollow, blur_ratio)


def agreement(verdict: Verdict, scene: world.Scene) -> dict[str, bool]:
    """Which attributes of the intended scene the judge found."""
    return {
        "colour": verdict.colour == scene.colour,
        "shape": verdict.shape == scene.shape,
        "background": verdict.background == scene.background,
        "style": verdict.style == scene.style,
    }
