"""A1111 infotext: exact format, parsing A1111's own text, round-trips, PNG chunk, params mapping."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdtune import __version__
from sdtune.errors import SdtuneError
from sdtune.generate.params import (
    DEFAULT_SAMPLER,
    GenerationParams,
    ModelInfo,
    infotext_for,
    params_from_infotext,
)
from sdtune.generate.pnginfo import (
    format_infotext,
    format_value,
    parse_infotext,
    png_info,
    read_png_infotext,
)

A1111_TEXT = (
    "masterpiece, a cat\n"
    "sitting on a chair\n"
    "Negative prompt: blurry, lowres\n"
    "bad hands\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, "
    "Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, "
    "VAE: sdxl_vae.safetensors, Denoising strength: 0.35, Clip skip: 2, "
    'Lora hashes: "add_detail: 7c6bad76eb54, epi: 0fd5c8f3a2", '
    "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: v1.10.1"
)


def test_format_matches_a1111_exactly():
    text = format_infotext("a cat", "blurry", {
        "Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 123, "Size": "512x512",
        "Model hash": "abcdef1234", "Model": "name", "VAE": None, "Refiner": "ref", "Refiner switch at": 0.8})
    assert text == ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, "
                    "Size: 512x512, Model hash: abcdef1234, Model: name, Refiner: ref, Refiner switch at: 0.8")
    assert format_infotext("a cat", "", {"Steps": 2, "Seed": 1, "Size": "8x8"}) == "a cat\nSteps: 2, Seed: 1, Size: 8x8"


def test_value_quoting():
    assert format_value(7.0) == "7" and format_value(7.5) == "7.5" and format_value(0.8) == "0.8"
    assert format_value("a, b") == '"a, b"' and format_value("x: y") == '"x: y"' and format_value("l1\nl2") == '"l1\\nl2"'
    assert format_value("plain") == "plain"


def test_parse_a1111_text():
    info = parse_infotext(A1111_TEXT)
    assert info.prompt == "masterpiece, a cat\nsitting on a chair"
    assert info.negative_prompt == "blurry, lowres\nbad hands"
    f = info.fields
    assert f["Steps"] == "30" and f["Sampler"] == "DPM++ 2M" and f["Schedule type"] == "Karras"
    assert f["Lora hashes"] == "add_detail: 7c6bad76eb54, epi: 0fd5c8f3a2"
    assert f["Refiner"] == "sd_xl_refiner_1.0 [7440042bbd]" and f["Version"] == "v1.10.1"
    assert list(f)[-3:] == ["Refiner", "Refiner switch at", "Version"]


def test_parse_without_negative_and_without_fields():
    assert parse_infotext("just a prompt").prompt == "just a prompt"
    assert parse_infotext("just a prompt").fields == {}
    info = parse_infotext("p\nSteps: 1, Seed: 2, Size: 8x8")
    assert (info.prompt, info.negative_prompt, info.fields["Seed"]) == ("p", "", "2")


def test_params_from_a1111_text():
    rec = params_from_infotext(parse_infotext(A1111_TEXT))
    p = rec.params
    assert (p.steps, p.sampler, p.cfg_scale, p.seed) == (30, "DPM++ 2M Karras", 6.5, 1234567890)
    assert (p.width, p.height, p.clip_skip) == (832, 1216, 2)
    assert (p.refiner, p.refiner_start) == ("sd_xl_refiner_1.0", 0.8)
    assert rec.model == ModelInfo("sd_xl_base_1.0", "31e35c80fc")
    assert rec.vae == ModelInfo("sdxl_vae.safetensors", "235745af8d")
    assert rec.refiner == ModelInfo("sd_xl_refiner_1.0", "7440042bbd")
    assert rec.extra["Denoising strength"] == "0.35"


def test_infotext_for_params_round_trip():
    params = GenerationParams(prompt="a red circle,\n on blue", negative_prompt="green", steps=4, cfg_scale=5.5,
                              seed=7, sampler="Euler a", width=64, height=48, batch_size=2, clip_skip=2,
                              refiner="ref", refiner_start=0.75)
    text = infotext_for(params, seed=8, width=64, height=48, model=ModelInfo("tiny", "0123456789"),
                        vae=ModelInfo("v.safetensors", "abcdefabcd"), refiner=ModelInfo("ref", "fedcba9876"),
                        batch_pos=1)
    assert text.endswith(f"Refiner: ref [fedcba9876], Refiner switch at: 0.75, Version: sdtune {__version__}")
    assert "Steps: 4, Sampler: Euler a, CFG scale: 5.5, Seed: 8, Size: 64x48, Model hash: 0123456789, " \
           "Model: tiny, VAE hash: abcdefabcd, VAE: v.safetensors, Batch size: 2, Batch pos: 1, Clip skip: 2" in text
    rec = params_from_infotext(parse_infotext(text))
    assert rec.params == params.replace(seed=8)
    assert rec.batch_pos == 1 and rec.model == ModelInfo("tiny", "0123456789")


def test_defaults_are_not_written():
    text = infotext_for(GenerationParams(prompt="x", seed=1), seed=1, width=8, height=8, model=ModelInfo("m"))
    assert text == f"x\nSteps: 20, Sampler: {DEFAULT_SAMPLER}, CFG scale: 7, Seed: 1, Size: 8x8, Model: m, " \
                   f"Version: sdtune {__version__}"


_line = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85"
                                                                                "\u2028\u2029"), max_size=20)
_multiline = st.lists(_line, max_size=3).map("\n".join).filter(
    lambda s: not any(line.startswith("Negative prompt:") for line in s.split("\n")))
_value = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=150, deadline=None)
@given(prompt=_multiline, negative=_multiline, model=_value, extra=_value, cfg=st.floats(-50, 50))
def test_round_trip_property(prompt, negative, model, extra, cfg):
    fields = {"Steps": 20, "CFG scale": cfg, "Seed": 3, "Model": model, "Lora hashes": extra}
    info = parse_infotext(format_infotext(prompt, negative, fields))
    assert info.prompt == prompt.strip()
    assert info.negative_prompt == (negative.strip() if negative else "")
    assert info.fields["Model"] == model and info.fields["Lora hashes"] == extra
    assert math.isclose(float(info.fields["CFG scale"]), cfg)


def test_png_chunk_round_trip_with_unicode(tmp_path):
    text = "猫, (cat:1.2)\nNegative prompt: ugly\nSteps: 2, Sampler: Euler, Seed: 1"
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(text))
    assert read_png_infotext(path) == text
    latin = tmp_path / "b.png"
    Image.new("RGB", (8, 8)).save(latin, pnginfo=png_info("cat\nSteps: 2, Seed: 1, Size: 8x8"))
    assert read_png_infotext(latin).startswith("cat\n")


def test_png_without_parameters(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(SdtuneError, match="no A1111 'parameters'"):
        read_png_infotext(path)
    with pytest.raises(SdtuneError, match="no such file"):
        read_png_infotext(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(SdtuneError, match="not a readable image"):
        read_png_infotext(tmp_path / "junk.png")


@pytest.mark.parametrize("change,match", [
    (dict(width=100), "multiple of 8"),
    (dict(height=0), "too small"),
    (dict(width=-64), "too small"),
    (dict(steps=0), "steps"),
    (dict(steps=-3), "steps"),
    (dict(steps=2.5), "whole number"),
    (dict(cfg_scale=float("nan")), "CFG"),
    (dict(cfg_scale=float("inf")), "CFG"),
    (dict(batch_size=0), "batch size"),
    (dict(batch_count=0), "batch count"),
    (dict(seed=-2), "seed"),
    (dict(refiner_start=1.0), "refiner switch"),
    (dict(sampler="warp drive"), "unknown sampler"),
])
def test_validation_errors(change, match):
    with pytest.raises(SdtuneError, match=match):
        GenerationParams(prompt="x", **change).validate()


def test_validation_canonicalises_sampler_and_fixes_seed():
    p = GenerationParams(sampler="dpmpp_2m_karras").validate()
    assert p.sampler == "DPM++ 2M Karras"
    seeded = p.with_seed()
    assert 0 <= seeded.seed < 2**32 and seeded.with_seed() is seeded


def test_unreadable_field():
    with pytest.raises(SdtuneError, match="Steps"):
        params_from_infotext(parse_infotext("p\nSteps: many, Seed: 1, Size: 8x8"))
