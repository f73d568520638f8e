"""Conformance: textual-inversion embeddings sdtune writes (`write_embedding`, which `train ti` and `convert` use),
in every format and family, against each tool's documented loading rule, stated as data in our own words.

Sources (read for this test; no code copied):
- A1111 = AUTOMATIC1111/stable-diffusion-webui v1.10, modules/textual_inversion/textual_inversion.py
  EmbeddingDatabase.load_from_file / get_expected_shape, modules/sd_hijack_clip + sd_models_xl (the width it
  expects: the text encoder's token width; SDXL: CLIP-L + OpenCLIP-G = 2048); the pickle whitelist is in
  tests/test_interop_a1111_pickles.py (modules/safe.py).
- ComfyUI = Comfy-Org/ComfyUI (master, 2026), comfy/sd1_clip.py load_embed / SDTokenizer._try_get_embedding /
  SDClipModel.process_tokens, comfy/sdxl_clip.py and comfy/text_encoders/sd2_clip.py (embedding_key, embedding_size).
- diffusers 0.42 = diffusers/loaders/textual_inversion.py load_textual_inversion_state_dicts /
  _retrieve_tokens_and_embeddings (and its documented SDXL recipe: one call per text encoder with
  state_dict["clip_l"] / state_dict["clip_g"]); run for real here on a tiny pipeline.
- kohya sd-scripts does not load embeddings for generation (it trains them): n/a.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sdtune.adapters.textual_inversion.files import Embedding, file_stem_for, write_embedding
from sdtune.errors import SdtuneError

# ---------------------------------------------------------------------------------------------------- A1111
A1111_EXTS = {".png": "image", ".webp": "image", ".jxl": "image", ".avif": "image", ".bin": "pickle",
              ".pt": "pickle", ".safetensors": "safetensors"}  # anything else in the folder is skipped
A1111_IMAGE_CHUNK = "sd-ti-embedding"  # base64 JSON, tensors as {"TORCHTENSOR": list}; name from its "name"
A1111_EXPECTED_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 768 + 1280}  # other widths: listed as "skipped"
# ---------------------------------------------------------------------------------------------------- ComfyUI
COMFY_EXTS = (".safetensors", ".pt", ".bin")  # tried after the bare name; .pt/.bin via torch.load(weights_only=True)
COMFY_NAME_STOPS = re.compile(r"[\s<\[]")  # the name in "embedding:NAME" ends at whitespace, '<' or '['
# (embedding_key, token width) of each text encoder's tokenizer; SD2's tokenizer keeps the default key clip_l
COMFY_ENCODERS = {"sd1": [("clip_l", 768)], "sd2": [("clip_l", 1024)], "sdxl": [("clip_l", 768), ("clip_g", 1280)]}

FAMILY_VECTORS = {"sd1": {"clip_l": 768}, "sd2": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}
FORMATS = [("safetensors", ".safetensors"), ("kohya", ".safetensors"), ("sdxl", ".safetensors"),
           ("diffusers", ".safetensors"), ("diffusers", ".bin"), ("a1111", ".pt"), ("png", ".png")]


class Refused(Exception):
    pass


def _load(path: Path) -> Any:
    """The object a tool gets from the file (images: A1111's text chunk)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            text = dict(im.text)  # type: ignore[attr-defined]
        if A1111_IMAGE_CHUNK not in text:
            raise Refused("no embedding chunk")
        return json.loads(base64.b64decode(text[A1111_IMAGE_CHUNK]),
                          object_hook=lambda d: torch.tensor(d["TORCHTENSOR"]) if "TORCHTENSOR" in d else d)
    return torch.load(path, map_location="cpu", weights_only=True)


def a1111_reads(path: Path, family: str) -> tuple[str, int]:
    """(name in prompts, number of vectors) as A1111's load_from_file reads the file, or Refused."""
    if A1111_EXTS.get(path.suffix.lower()) is None:
        raise Refused("extension not listed")
    if path.suffix.lower() in (".bin", ".pt"):
        from test_interop_a1111_pickles import A1111Refused, a1111_accepts

        try:
            a1111_accepts(path)
        except A1111Refused as exc:
            raise Refused(str(exc)) from None
    data = _load(path)
    name = data.get("name", path.stem) if path.suffix == ".png" else path.stem
    if "string_to_param" in data:
        params = data["string_to_param"]
        if len(params) != 1:
            raise Refused("multiple terms")
        vec = next(iter(params.values()))
        width, n = vec.shape[-1], vec.shape[0]
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:
        if not all(isinstance(v, torch.Tensor) for v in data.values()):  # every value is .detach()ed
            raise Refused("'str' object has no attribute 'detach'")
        width, n = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif type(data) is dict and type(next(iter(data.values()))) is torch.Tensor:
        if len(data) != 1:
            raise Refused("multiple terms")
        vec = next(iter(data.values()))
        vec = vec.unsqueeze(0) if vec.ndim == 1 else vec
        width, n = vec.shape[-1], vec.shape[0]
    else:
        raise Refused("neither textual inversion embedding nor diffuser concept")
    if width != A1111_EXPECTED_WIDTH[family]:
        raise Refused(f"skipped: width {width}")
    return name, n


def comfy_reads(path: Path, family: str) -> list[torch.Tensor]:
    """The tensor each text encoder of `family` gets from `embedding:<stem>` in ComfyUI, or Refused."""
    stem = path.stem
    if COMFY_NAME_STOPS.search(stem) or path.suffix not in COMFY_EXTS:
        raise Refused("not found by name")
    data = _load(path)
    out = []
    for key, width in COMFY_ENCODERS[family]:
        if "string_to_param" in data:
            t = next(iter(data["string_to_param"].values()))
        elif key in data:
            t = data[key]
        else:
            t = next(iter(data.values()))
        if not isinstance(t, torch.Tensor) or t.shape[-1] != width:
            raise Refused(f"shape mismatch, ignored ({key})")
        out.append(t.reshape(-1, width))
    return out


def _embedding(family: str, n: int = 2, seed: int = 0) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    return Embedding(name="shiny", token="<shiny>", step=5,
                     vectors={k: torch.randn(n, w, generator=g) for k, w in FAMILY_VECTORS[family].items()})


def _write(tmp_path: Path, family: str, fmt: str, ext: str) -> Path:
    return write_embedding(_embedding(family), tmp_path / f"shiny{ext}", fmt)


CELLS = [(f, fmt, ext) for f in ("sd1", "sd2", "sdxl") for fmt, ext in FORMATS
         if not (fmt == "sdxl" and f != "sdxl") and not (f == "sdxl" and fmt in ("a1111", "png"))]


@pytest.mark.parametrize("family,fmt,ext", CELLS)
def test_a1111_loads_every_embedding_we_write(tmp_path, family, fmt, ext):
    path = _write(tmp_path, family, fmt, ext)
    name, n = a1111_reads(path, family)
    assert (name, n) == ("shiny", 2)


@pytest.mark.parametrize("family,fmt,ext", [c for c in CELLS if c[2] != ".png"])
def test_comfyui_loads_every_embedding_we_write_except_images(tmp_path, family, fmt, ext):
    path = _write(tmp_path, family, fmt, ext)
    want = _embedding(family).vectors
    got = comfy_reads(path, family)
    keys = [k for k in ("clip_l", "clip_h", "clip_g") if k in want]
    assert len(got) == len(keys) and all(torch.equal(g, want[k]) for g, k in zip(got, keys))


def test_comfyui_has_no_image_embeddings(tmp_path):
    with pytest.raises(Refused, match="not found"):
        comfy_reads(_write(tmp_path, "sd1", "png", ".png"), "sd1")


@pytest.mark.parametrize("fmt,ext", [f for f in FORMATS if f[0] != "sdxl"])
def test_diffusers_load_textual_inversion_reads_each_format(tmp_path, fmt, ext):
    """diffusers' own loader, for real, on the tiny SD1 pipeline (its token width is 64: the rule is the layout)."""
    from sdtune.models.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    vec = torch.randn(2, 64)
    path = write_embedding(Embedding("shiny", {"*": vec}, token="<shiny>"), tmp_path / f"shiny{ext}", fmt)
    if fmt == "png":  # diffusers reads .safetensors and pickles only
        with pytest.raises(Exception):
            pipe.load_textual_inversion(str(path), token="<shiny>")
        return
    pipe.load_textual_inversion(str(path), token="<shiny>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<shiny>", "<shiny>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), vec)


def test_diffusers_reads_the_sdxl_file_one_encoder_at_a_time(tmp_path):
    """diffusers' documented SDXL recipe: state_dict["clip_l"] into text_encoder, ["clip_g"] into text_encoder_2."""
    from sdtune.models.testing import tiny_pipeline

    pipe = tiny_pipeline("sdxl")
    l, g = torch.randn(2, 64), torch.randn(2, 64)  # the tiny SDXL's two encoders are both 64 wide
    path = write_embedding(Embedding("x", {"clip_l": l, "clip_g": g}), tmp_path / "x.safetensors", "sdxl")
    with pytest.raises(ValueError):  # one call on the file: two keys, neither layout diffusers knows
        pipe.load_textual_inversion(str(path), token="<x>")
    sd = load_file(str(path))
    pipe.load_textual_inversion(sd["clip_l"], token="<x>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token="<x>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<x>", "<x>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), l)
    ids2 = pipe.tokenizer_2.convert_tokens_to_ids(["<x>", "<x>_1"])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids2].detach(), g)


@pytest.mark.parametrize("fmt", ["a1111", "png"])
def test_sdxl_formats_a1111_cannot_read_are_refused_before_writing(tmp_path, fmt):
    """A1111 runs .detach() on every value of an SDXL dict, so a .pt/.png with name/step strings crashes it."""
    emb = _embedding("sdxl")
    with pytest.raises(SdtuneError, match="clip_l \\+ clip_g"):
        write_embedding(emb, tmp_path / f"x.{'pt' if fmt == 'a1111' else 'png'}", fmt)
    bad = tmp_path / "crash.pt"  # what such a file would be
    torch.save({**emb.vectors, "name": "x", "step": 0}, bad, _use_new_zipfile_serialization=False)
    with pytest.raises(Refused, match="detach"):
        a1111_reads(bad, "sdxl")


def test_wrong_family_is_skipped_by_both_tools(tmp_path):
    """The width rule: an SD1 file in an SD2 model is skipped by A1111 and ignored by ComfyUI."""
    path = _write(tmp_path, "sd1", "safetensors", ".safetensors")
    with pytest.raises(Refused, match="skipped"):
        a1111_reads(path, "sd2")
    with pytest.raises(Refused, match="shape mismatch"):
        comfy_reads(path, "sd2")


@pytest.mark.parametrize("token", ["<shiny>", "my style", "[odd] (name), x", "a<b", "emb:1"])
def test_file_names_we_choose_are_usable_in_both_tools(token):
    """`train ti` names the file after the token: the stem must be what a user types in A1111 (the stem; prompt
    syntax characters would be read as emphasis or a separator) and in ComfyUI (`embedding:<stem>`, ends at
    whitespace, '<' or '[')."""
    stem = file_stem_for(token)
    assert stem and not COMFY_NAME_STOPS.search(stem)
    assert not re.search(r"[()\[\],:]", stem), stem
