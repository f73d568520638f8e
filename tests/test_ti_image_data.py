"""A1111 image embeddings whose `sd-ti-embedding` chunk was stripped: the copy of the data in the pixels.

Facts (A1111 modules/textual_inversion/image_embedding.py): the payload is zlib(level 9) of the JSON of the
embedding dict with tensors as {"TORCHTENSOR": nested list} (no pickle). Its bytes, repeated to fill whole
(height x w x 3) blocks, are split into low and high nibbles, each XORed with the low 4 bits of an LCG stream
(seed 0, seed = (1664525 * seed + 1013904223) mod 2^32, value seed mod 255; A1111's own self-test lists the first 100
values and the sum 12731374 of the next 100000), and laid out as: low block | black column | image | black column |
high block. The high 4 bits of the blocks' bytes are decoration. The reader crops borders without any pixel whose
three channels are all > 0, keeps the low 4 bits, and takes the blocks left of the first / right of the last
all-zero column. The reference encoder and decoder below follow that text with plain Python loops, independently
of sdtune's vectorised code."""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.adapters.textual_inversion import Embedding, read_embedding, write_embedding
from sdtune.adapters.textual_inversion.files import PNG_CHUNK
from sdtune.adapters.textual_inversion.image_data import lcg_stream
from sdtune.errors import SdtuneError

A1111_FIRST_100 = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215, 220, 194,
                   126, 28, 240, 179, 160, 153, 149, 50, 105, 14, 21, 218, 199, 18, 54, 198, 193, 38, 128, 19, 53, 195,
                   124, 75, 205, 12, 6, 145, 0, 28, 30, 148, 8, 45, 218, 171, 55, 249, 97, 166, 12, 35, 0, 41, 221,
                   122, 215, 170, 31, 113, 186, 97, 119, 31, 23, 185, 66, 140, 30, 41, 37, 63, 137, 109, 216, 55, 159,
                   145, 82, 204, 86, 73, 222, 44, 198, 118, 240, 97]


def ref_lcg(n: int) -> list[int]:
    seed, out = 0, []
    for _ in range(n):
        seed = (1664525 * seed + 1013904223) % 2 ** 32
        out.append(seed % 255)
    return out


def ref_xor(block: np.ndarray) -> np.ndarray:
    stream = np.array(ref_lcg(block.size), dtype=np.uint8).reshape(block.shape)
    return block.astype(np.uint8) ^ (stream & 0x0F)


def ref_encode(picture: np.ndarray, data: dict, g: np.random.Generator) -> np.ndarray:
    h = picture.shape[0]
    raw = np.frombuffer(zlib.compress(json.dumps(data).encode(), level=9), np.uint8)
    size = raw.shape[0] + (h - raw.shape[0] % h)
    size += h * 3 - size % (h * 3)
    full = np.resize(raw, size).reshape(h, -1, 3)
    deco = lambda: (g.integers(1, 16, full.shape) << 4).astype(np.uint8)  # noqa: E731  (A1111 draws dots here)
    low, high = ref_xor(full & 0x0F) | deco(), ref_xor(full >> 4) | deco()
    sep = np.zeros((h, 1, 3), np.uint8)
    return np.concatenate([low, sep, picture, sep, high], axis=1)


def ref_decode(pixels: np.ndarray) -> dict:
    mask = (pixels > 0).all(2)
    cols, rows = np.where(mask.any(0))[0], np.where(mask.any(1))[0]
    img = pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1] & 0x0F
    black = np.where(img.sum(axis=(0, 2)) == 0)[0]
    low, high = ref_xor(img[:, :black.min()]), ref_xor(img[:, black.max() + 1:])
    return json.loads(zlib.decompress(((high << 4) | low).flatten().tobytes()))


def test_lcg_is_a1111s():
    stream = lcg_stream(100_100)
    assert stream[:100].tolist() == A1111_FIRST_100 == ref_lcg(100)
    assert int(stream[100:].astype(np.int64).sum()) == 12731374


def test_stripped_a1111_image_embedding_loads_from_its_pixels(tmp_path):
    g = np.random.default_rng(0)
    vec = g.standard_normal((2, 768)).round(4).tolist()
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": vec}}, "name": "stripped",
            "step": 500, "sd_checkpoint": "abcd", "sd_checkpoint_name": "m"}
    picture = g.integers(30, 255, (96, 128, 3)).astype(np.uint8)
    Image.fromarray(ref_encode(picture, data, g)).save(tmp_path / "file_name.png")  # no text chunk
    emb = read_embedding(tmp_path / "file_name.png")
    assert emb.name == "stripped" and emb.step == 500  # the name stored in it, as A1111
    torch.testing.assert_close(emb.vectors["clip_l"], torch.tensor(vec, dtype=torch.float32))


def test_sdtune_png_keeps_a_pixel_copy_that_a1111s_rule_reads(tmp_path):
    vec = torch.randn(3, 768, generator=torch.Generator().manual_seed(1))
    path = write_embedding(Embedding("cardy", {"clip_l": vec}, step=9), tmp_path / "cardy.png", "png")
    with Image.open(path) as im:
        chunk = json.loads(base64.b64decode(im.text[PNG_CHUNK]))
        pixels = np.asarray(im.convert("RGB"))
        im.convert("RGB").save(tmp_path / "stripped.png")  # what an image host leaves: pixels only
    with Image.open(tmp_path / "stripped.png") as im:
        assert PNG_CHUNK not in im.info
    assert ref_decode(pixels) == chunk  # A1111's reading rule gives the chunk's dict
    emb = read_embedding(tmp_path / "stripped.png")
    assert emb.name == "cardy"
    torch.testing.assert_close(emb.vectors["clip_l"], vec)


@pytest.mark.parametrize("kind", ["noise", "bars"])
def test_ordinary_images_are_still_not_embeddings(tmp_path, kind):
    g = np.random.default_rng(2)
    px = g.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    if kind == "bars":  # two black columns, garbage between: not zlib data
        px[:, 10] = 0
        px[:, 50] = 0
    Image.fromarray(px).save(tmp_path / "pic.png")
    with pytest.raises(SdtuneError, match="without an embedding"):
        read_embedding(tmp_path / "pic.png")
