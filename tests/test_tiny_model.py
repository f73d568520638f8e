"""The bundled `tiny` model: it loads from the package, its VAE round-trips what the judge reads, it draws the
world, and the demo runs end to end."""

import random

import pytest

from sdtune.toy import world
from sdtune.toy.judge import agreement, judge


@pytest.fixture(scope="module")
def tiny():
    from sdtune.models import load_model

    return load_model("tiny")


def test_tiny_is_bundled_sd1_architecture(tiny):
    assert tiny.family == "sd1" and tiny.prediction_type == "epsilon"
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(tiny.pipe.unet, UNet2DConditionModel) and isinstance(tiny.pipe.vae, AutoencoderKL)
    assert isinstance(tiny.pipe.text_encoder, CLIPTextModel) and isinstance(tiny.pipe.tokenizer, CLIPTokenizer)
    tok = tiny.pipe.tokenizer
    assert (tok.bos_token, tok.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert tiny.pipe.text_encoder.config.eos_token_id == tok.eos_token_id


def test_reloaded_vae_reconstructions_read_like_the_originals(tiny):
    """A VAE can reach a low loss and still come back with wrong colours; the judge is the check."""
    from sdtune.toy.evaluate import vae_round_trip

    rng = random.Random(11)
    scenes = [world.random_scene(rng, styles=("solid", "outline")) for _ in range(48)]
    images = vae_round_trip(tiny.pipe.vae, [world.render(s) for s in scenes])
    same = {k: 0 for k in ("colour", "shape", "background")}
    for scene, img in zip(scenes, images):
        found = agreement(judge(img), scene)
        for k in same:
            same[k] += found[k]
    rates = {k: v / len(scenes) for k, v in same.items()}
    assert rates["colour"] >= 0.95 and rates["background"] >= 0.95 and rates["shape"] >= 0.9, rates


def test_tiny_draws_base_prompts(tiny):
    from sdtune.generate import Generator
    from sdtune.toy.evaluate import base_prompts, evaluate

    prompts = base_prompts()[::4]  # 15 of the 60 base prompts, every shape, colour and background
    report = evaluate(Generator(tiny), prompts, seeds=1, steps=20)
    assert report.rates["colour"] >= 0.8 and report.rates["background"] >= 0.9 and report.rates["shape"] >= 0.6, \
        report.summary()


def test_demo_writes_grid_and_report(tmp_path):
    from sdtune.cli import main

    main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4"])
    report = (tmp_path / "demo" / "report.txt").read_text()
    assert "judge agreement" in report
    assert (tmp_path / "demo" / "base_grid.png").stat().st_size > 1000
