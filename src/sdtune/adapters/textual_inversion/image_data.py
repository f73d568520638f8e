"""A1111's embedding data hidden in an image's pixels, for PNG embeddings whose `sd-ti-embedding` text chunk was
stripped (image hosts and chat apps drop text chunks; A1111 still loads such files from the pixels).

Why a second copy in the pixels: A1111 writes both when it saves an image embedding, and reads the pixels when the
chunk is gone (modules/textual_inversion/image_embedding.py, `insert_image_data_embed` / `extract_image_data_embed`).
The rule, as that file encodes it:

* payload: zlib (level 9) of the same JSON as the chunk (tensors as {"TORCHTENSOR": nested list}); never a pickle.
* the payload bytes, repeated to fill (numpy `resize`) a whole number of image-height x 3 blocks, are split into low
  and high nibbles, each laid out as an RGB block of shape (height, w, 3) in C order, and XORed with the low 4 bits
  of an LCG stream (seed 0; seed <- (1664525 * seed + 1013904223) mod 2^32; value seed mod 255). The high 4 bits of
  each block's bytes are decoration (A1111 draws dots there) and carry nothing.
* picture layout, left to right: low block, one black column, the image, one black column, high block.
* reading: crop the borders where no pixel has all three channels > 0, keep the low 4 bits, find the columns that are
  then all zero; the part left of the first is the low block, right of the last the high block; XOR both with the
  stream, byte = high << 4 | low, zlib-decompress, parse the JSON.

Writing here puts a constant 0x80 in the high bits of the blocks (all three channels > 0, so the border crop never
cuts into the data), where A1111 draws dots; A1111's reader ignores those bits.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable

import numpy as np

MAX_PAYLOAD = 256 * 1024 * 1024  # decompressed bytes accepted from pixels (an embedding is a few MB at most)
_DEPTH = 3


def lcg_stream(n: int) -> np.ndarray:
    """The first n values of A1111's `lcg()` (uint8), without a Python loop: seed_k = c * sum_{j<k} a^j mod 2^32,
    computed with wrapping uint64 arithmetic (exact mod 2^32 because 2^32 divides 2^64)."""
    if n <= 0:
        return np.zeros(0, dtype=np.uint8)
    a, c = np.uint64(1664525), np.uint64(1013904223)
    with np.errstate(over="ignore"):
        powers = np.empty(n, dtype=np.uint64)
        powers[0] = 1
        if n > 1:
            powers[1:] = a
            powers = np.cumprod(powers, dtype=np.uint64)  # a^0, a^1, ... (mod 2^64)
        seeds = (np.cumsum(powers, dtype=np.uint64) * c) & np.uint64(0xFFFFFFFF)
    return (seeds % np.uint64(255)).astype(np.uint8)


def _xor(block: np.ndarray) -> np.ndarray:
    return np.bitwise_xor(block.astype(np.uint8), lcg_stream(block.size).reshape(block.shape) & 0x0F)


def _crop_black(img: np.ndarray) -> np.ndarray:
    mask = np.asarray((img > 0).all(axis=2))
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return img[:0, :0]
    return img[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]


def extract_payload(pixels: np.ndarray, object_hook: Callable[[dict], Any] | None = None) -> Any | None:
    """The JSON object stored in an RGB pixel array (height, width, 3) by A1111's rule, or None when the image
    holds none (an ordinary picture)."""
    if pixels.ndim != 3 or pixels.shape[2] != _DEPTH:
        return None
    low4 = _crop_black(pixels.astype(np.uint8)) & 0x0F
    black = np.where(low4.sum(axis=(0, 2)) == 0)[0]
    if black.shape[0] < 2:
        return None
    lower, upper = low4[:, : black.min(), :], low4[:, black.max() + 1:, :]
    if lower.size == 0 or lower.shape != upper.shape:
        return None
    data = ((_xor(upper) << 4) | _xor(lower)).flatten().tobytes()
    try:
        raw = zlib.decompressobj().decompress(data, MAX_PAYLOAD)
        return json.loads(raw, object_hook=object_hook)
    except (zlib.error, ValueError, RecursionError):  # not zlib/JSON (an ordinary picture), or hostile nesting
        return None


def insert_payload(pixels: np.ndarray, payload: bytes) -> np.ndarray:
    """`pixels` (height, width, 3) with zlib(payload) laid out around it as A1111 lays it out (see the docstring)."""
    h = int(pixels.shape[0])
    data = np.frombuffer(zlib.compress(payload, level=9), np.uint8)
    size = data.shape[0] + (h - data.shape[0] % h)  # A1111's padding: whole columns of height x 3
    size = size + (h * _DEPTH - size % (h * _DEPTH))
    full = np.resize(data, size).reshape(h, -1, _DEPTH)
    low = _xor(full & 0x0F) | 0x80
    high = _xor(full >> 4) | 0x80
    sep = np.zeros((h, 1, _DEPTH), dtype=np.uint8)
    return np.concatenate([low, sep, pixels.astype(np.uint8), sep, high], axis=1)
