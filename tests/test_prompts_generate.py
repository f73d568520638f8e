"""Prompts in generation: plain prompts unchanged, prompt editing per step, AND guidance, infotext, CLI.

Tiny random SD1 model from a diffusers folder, 2-4 steps, 32x32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune.cli.testing import exit_code as cli
from sdtune.generate import GenerationParams, Generator, encode_with_pipeline
from sdtune.generate.guidance import GuidanceSchedule, Guide, ScheduledCond, guided_unet
from sdtune.generate.params import ModelInfo, infotext_for, params_from_infotext
from sdtune.generate.pnginfo import parse_infotext

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def gen(tiny_random_dir) -> Generator:
    return Generator(str(tiny_random_dir), device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


P = GenerationParams(prompt="a red circle on a white background", negative_prompt="blurry", steps=3, seed=4,
                     width=32, height=32, sampler="Euler")


def test_plain_prompt_images_equal_diffusers_encoding(gen, tiny_random_dir):
    ref = Generator(gen.model, encode_prompt=encode_with_pipeline)
    assert np.array_equal(pixels(gen.generate(P)[0].image), pixels(ref.generate(P)[0].image))
    assert "forward" not in vars(gen.model.pipe.unet)  # no wrapper for plain prompts


def test_and_with_half_weights_equals_the_single_prompt(gen):
    single = gen.generate(P)[0].image
    halves = gen.generate(P.replace(prompt=f"{P.prompt} :0.5 AND {P.prompt} :0.5"))[0].image
    assert np.abs(pixels(single) - pixels(halves)).max() <= 2
    other = gen.generate(P.replace(prompt=f"{P.prompt} AND a blue square :0.8"))[0].image
    assert np.abs(pixels(single) - pixels(other)).max() > 2
    assert "forward" not in vars(gen.model.pipe.unet)  # the wrapper is gone after the run


def test_prompt_editing_switches_conditioning_per_step(gen):
    from sdtune.prompts import WeightedPromptEncoder

    pipe = gen.model.pipe
    seen = []
    original = pipe.unet.forward

    def record(sample, timestep, encoder_hidden_states, *a, **kw):
        seen.append(encoder_hidden_states.detach().clone())
        return original(sample, timestep, encoder_hidden_states, *a, **kw)

    pipe.unet.forward = record
    try:
        gen.generate(P.replace(prompt="a [red circle:blue square:1] on a white background", steps=4))
    finally:
        del pipe.unet.forward
    enc = WeightedPromptEncoder()
    first = enc(pipe, "a red circle on a white background", "", num_images=1, do_cfg=False, clip_skip=1)
    second = enc(pipe, "a blue square on a white background", "", num_images=1, do_cfg=False, clip_skip=1)
    # A1111: 0-based steps 0 and 1 use the text before the switch (end step 1), steps 2 and 3 the one after
    used = [h[1] for h in seen]
    assert len(used) == 4
    assert torch.equal(used[0], first.prompt_embeds[0]) and torch.equal(used[1], first.prompt_embeds[0])
    assert torch.equal(used[2], second.prompt_embeds[0]) and torch.equal(used[3], second.prompt_embeds[0])


def test_guided_unet_combines_parts_like_a1111():
    class FakeUNet(torch.nn.Module):
        def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
            return (sample * encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None],)

    unet = FakeUNet()

    class Pipe:
        pass

    pipe = Pipe()
    pipe.unet = unet
    u, a, b = (torch.full((1, 77, 4), v) for v in (1.0, 2.0, 5.0))
    sched = GuidanceSchedule(ScheduledCond([4], [u]), [ScheduledCond([4], [a], weight=1.0),
                                                      ScheduledCond([1, 4], [a, b], weight=0.5)])
    x = torch.ones(2, 4, 2, 2)
    with guided_unet(pipe, Guide(sched)) as guide:
        out = unet(x, torch.tensor(10), torch.zeros(2, 77, 4))[0]
        assert torch.allclose(out[0], torch.ones(4, 2, 2))  # uncond
        assert torch.allclose(out[1], torch.full((4, 2, 2), 1 + 1.0 * (2 - 1) + 0.5 * (2 - 1)))
        guide.step_done(1)  # step 2 now: the second part switched to b
        out = unet(x, torch.tensor(10), torch.zeros(2, 77, 4))[0]
        assert torch.allclose(out[1], torch.full((4, 2, 2), 1 + 1.0 * (2 - 1) + 0.5 * (5 - 1)))
    assert "forward" not in vars(unet)


def test_infotext_records_syntax_and_emphasis():
    p = P.replace(prompt="a ball++", prompt_syntax="compel", emphasis="none", seed=1)
    text = infotext_for(p, seed=1, width=32, height=32, model=ModelInfo("m"))
    assert "Prompt syntax: compel, Emphasis: No norm" in text
    back = params_from_infotext(parse_infotext(text)).params
    assert back.prompt_syntax == "compel" and back.emphasis == "none"
    plain = infotext_for(P.replace(seed=1), seed=1, width=32, height=32, model=ModelInfo("m"))
    assert "Emphasis" not in plain and "Prompt syntax" not in plain
    with pytest.raises(Exception, match="emphasis"):
        P.replace(emphasis="loud").validate()


def test_cli_prompt_explain(capsys, tiny_random_dir):
    assert cli(["prompt", "explain", "a (red:1.3) [cat:dog:0.5] <lora:foo:0.7> AND a ball :0.5", "--steps", "10",
                "--negative", "blurry"]) == 0
    out = capsys.readouterr().out
    for piece in ("syntax: a1111   emphasis: original", "extra network: lora 'foo' weight 0.7", "AND parts: 2",
                  "part 2 (weight 0.5)", "steps 0-5 (0-based): 'a (red:1.3) cat'", "steps 6-9 (0-based)",
                  "red(1.3)", "chunk 1/1", "negative prompt: 'blurry'"):
        assert piece in out, piece
    assert cli(["prompt", "explain", "a circle++", "--model", str(tiny_random_dir), "--emphasis", "none"]) == 0
    out = capsys.readouterr().out
    assert "syntax: compel   emphasis: none" in out and "circle(1.21)" in out
    assert cli(["prompt", "explain", "x", "--model", "/nonexistent/model"]) == 2
    assert capsys.readouterr().err.startswith("error: model")


def test_cli_generate_with_syntax_options(tiny_random_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["generate", "a (red:1.2) circle AND a square :0.3", "--model", str(tiny_random_dir), "--steps", "2",
                "--width", "32", "--height", "32", "--device", "cpu", "--seed", "3", "--emphasis", "none",
                "--prompt-syntax", "a1111", "--out", str(out)]) == 0
    from sdtune.generate import read_png_infotext

    text = read_png_infotext(out / "00000-3.png")
    assert "Prompt syntax: a1111, Emphasis: No norm" in text


def test_sdxl_base_and_refiner_with_and_and_prompt_editing(tmp_path):
    from sdtune.models import LoadedModel
    from sdtune.models.testing import tiny_pipeline

    def loaded(family, name):
        return LoadedModel(pipe=tiny_pipeline(family), family=family, prediction_type="epsilon", name=name,
                           hash=None, source=tmp_path / name, device=torch.device("cpu"), dtype=torch.float32)

    base, refiner = loaded("sdxl", "xl"), loaded("sdxl-refiner", "xl-ref")
    g = Generator(base, refiner=refiner)
    p = GenerationParams(prompt="a [cat:dog:2] AND a tree :0.5", negative_prompt="blurry", steps=4, seed=1,
                         sampler="Euler", refiner="xl-ref", refiner_start=0.5)
    plain = g.generate(p.replace(prompt="a cat"))[0].image
    image = g.generate(p)[0].image
    assert image.size == plain.size and np.abs(pixels(image) - pixels(plain)).max() > 0
    assert "forward" not in vars(base.pipe.unet) and "forward" not in vars(refiner.pipe.unet)
    # the refiner continues the base's step count: its guide starts at the number of base steps
    from sdtune.generate import generator as generator_module

    starts = []
    real_guide = generator_module.Guide

    class Spy(real_guide):
        def __init__(self, schedule, start=0):
            starts.append(start)
            super().__init__(schedule, start)

    generator_module.Guide = Spy
    try:
        g.generate(p)
    finally:
        generator_module.Guide = real_guide
    assert starts == [0, 2]
