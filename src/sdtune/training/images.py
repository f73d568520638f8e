"""Training images: decoding any file to plain 8-bit RGB, fitting it to a training size, augmentations and the
image -> tensor step. Pure PIL/numpy/torch (no torchvision); everything random takes a seeded `random.Random`.

Conventions (documented in README "Training data"):
* EXIF orientation is applied (`ImageOps.exif_transpose`), so phone photos train upright.
* Transparency (RGBA, LA, PA, P/L/RGB with a transparent colour) is composited on **white**, as A1111 does.
* 16-bit greyscale (I;16*) is scaled by 1/257 (65535 -> 255), not clipped; 32-bit "I" is scaled the same way when
  its values exceed 255; float "F" images in 0..1 are scaled by 255.
* CMYK and other modes convert to RGB; an embedded ICC profile is honoured (converted to sRGB) when Pillow's
  littleCMS is available, otherwise the plain conversion is used.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif")
WHITE = (255, 255, 255)

# What Pillow raises for files it cannot decode: not an image, truncated data, broken streams, absurd sizes.
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError,
                                                  Image.DecompressionBombError)


def describe_error(exc: BaseException) -> str:
    """A short reason for an unreadable image, for lists of bad files."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return "truncated"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels"
    return f"broken ({text[:80]})"


def open_image(src: str | Path | bytes, *, draft: int | None = None) -> tuple[Image.Image, dict]:
    """Decode `src` (a path or the file's bytes) fully and return (8-bit RGB image, facts).

    facts: {"mode": original mode, "size": (w, h) after EXIF rotation at full resolution, "exif_rotated": bool,
    "alpha": bool (some pixels are transparent)}. `draft` lets JPEG decoding shrink by a power of two while both
    sides stay >= draft pixels (huge photos then decode several times faster). Raises one of DECODE_ERRORS for
    unreadable files."""
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    with Image.open(fp) as im:
        full = im.size
        mode = im.mode
        if draft and im.format in ("JPEG", "MPO"):
            im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else None, (draft, draft))
        im.load()  # full decode: truncated or broken data fails here, not in the middle of training
        orientation = im.getexif().get(0x0112, 1)
        rotated = orientation in (5, 6, 7, 8)
        out = ImageOps.exif_transpose(im) if orientation not in (None, 1) else im
        has_alpha = out.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in out.info
        if has_alpha:  # only report images that really have see-through pixels
            alpha_min = out.convert("RGBA").getchannel("A").getextrema()[0]
            assert isinstance(alpha_min, (int, float))  # one band: (min, max)
            has_alpha = alpha_min < 255
        rgb = to_rgb(out)
    size = (full[1], full[0]) if rotated else full
    return rgb, {"mode": mode, "size": size, "exif_rotated": orientation not in (None, 1), "alpha": has_alpha}


def _scale16(arr: np.ndarray, mode: str) -> np.ndarray:
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        a = a / 257.0
    elif mode == "F":
        top = float(a.max()) if a.size else 0.0
        a = a * 255.0 if top <= 1.0 else a * (255.0 / top if top > 255 else 1.0)
    else:  # "I": 32-bit ints, usually 16-bit data
        top = float(a.max()) if a.size else 0.0
        a = a if top <= 255 else a / 257.0 if top <= 65535 else a * (255.0 / top)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _icc_to_srgb(im: Image.Image) -> Image.Image | None:
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK"):
        return None
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if im.mode == "RGB" and "srgb" in ImageCms.getProfileDescription(src).lower():
            return None  # already sRGB (most embedded profiles): nothing to do
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # no littleCMS, or a broken profile: fall back to the plain conversion
        return None


def to_rgb(im: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow image as 8-bit RGB: alpha composited on `background`, 16-bit scaled, CMYK/ICC converted."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return Image.fromarray(_scale16(np.asarray(im), im.mode)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if im.mode == "RGB":
        return _icc_to_srgb(im) or im.copy()
    if im.mode == "CMYK":
        return _icc_to_srgb(im) or im.convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------------- sizes and buckets

def cover_scale(size: tuple[int, int], target: tuple[int, int]) -> float:
    """The scale at which an image of `size` just covers `target` (> 1 means it must be upscaled)."""
    return max(target[0] / size[0], target[1] / size[1])


def fit_image(img: Image.Image, target: tuple[int, int], *, crop: str = "center", rng: random.Random | None = None,
              zoom: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
    """Resize `img` keeping its aspect ratio so that it covers `target` (w, h), then crop to exactly `target`.

    crop="center" cuts equally from both sides; crop="random" picks the window with `rng`, and `zoom` (>= 1)
    additionally enlarges by a random factor first (random crop and scale). Downscaling uses Lanczos, upscaling
    bicubic."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    w, h = img.size
    tw, th = target
    s = cover_scale((w, h), target)
    if crop == "random" and zoom != (1.0, 1.0):
        s *= (rng or random.Random(0)).uniform(*zoom)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if s < 1 else Image.Resampling.BICUBIC,
                         reducing_gap=3.0 if s < 0.5 else None)
    if crop == "random":
        r = rng or random.Random(0)
        left, top = r.randint(0, nw - tw), r.randint(0, nh - th)
    else:
        left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def make_buckets(resolution: int, *, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (w, h): multiples of `step`, area <= resolution**2, long/short side <= max_ratio.
    Always contains (resolution, resolution) when resolution is a multiple of step."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * max_ratio + 1e-9:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio + 1e-9:
            out.add((w, h))
            out.add((h, w))
        w += step
    if resolution % step == 0:
        out.add((resolution, resolution))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to size's (log-ratio distance; larger area breaks ties)."""
    r = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


# ------------------------------------------------------------------------------------------------- augmentations

def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def colour_jitter(img: Image.Image, rng: random.Random, *, brightness: float = 0.0, contrast: float = 0.0,
                  saturation: float = 0.0, hue: float = 0.0) -> Image.Image:
    """Random brightness/contrast/saturation factors in [1-x, 1+x] and a hue shift in [-hue, hue] turns (0..0.5),
    applied in that order. All zero returns the image unchanged."""
    for amount, enhancer in ((brightness, ImageEnhance.Brightness), (contrast, ImageEnhance.Contrast),
                             (saturation, ImageEnhance.Color)):
        if amount > 0:
            img = enhancer(img).enhance(rng.uniform(max(0.0, 1 - amount), 1 + amount))
    if hue > 0:
        shift = rng.uniform(-hue, hue)
        hsv = np.array(img.convert("HSV"))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(shift * 256)) % 256).astype(np.uint8)
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 CHW tensor in [-1, 1] (the VAE's input range)."""
    a = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) / 127.5 - 1.0


def to_image(t: torch.Tensor) -> Image.Image:
    """The inverse of `to_tensor` (for previews and tests)."""
    a = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(a)).copy()
