"""`<lora:name:weight>` tags in prompts applied at generation: --lora-dir lookup (and the --lora files' folders),
switching on/off/re-weighting between images without reloading, the infotext keeping the tags."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sdtune.errors import SdtuneError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning", "ignore::RuntimeWarning")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import KOHYA_UNET, TEXT, random_network
    from sdtune.models.testing import save_tiny_pipeline

    d = tmp_path_factory.mktemp("lora_tags")
    pipe = save_tiny_pipeline(d / "model")
    (d / "loras" / "styles").mkdir(parents=True)
    (d / "other").mkdir()
    style = save_lora(random_network(pipe, unet=KOHYA_UNET, text=TEXT, seed=1, scale=0.5),
                      d / "loras" / "styles" / "ink.safetensors")
    shape = save_lora(random_network(pipe, unet=KOHYA_UNET, seed=2, scale=0.5), d / "other" / "heart.safetensors")
    return {"dir": d, "model": d / "model", "style": style, "shape": shape}


@pytest.fixture(scope="module")
def gen(setup):
    from sdtune.generate import Generator

    return Generator(str(setup["model"]), lora_dirs=[setup["dir"] / "loras"])


def image(gen, prompt, seed=3):
    from sdtune.generate import GenerationParams

    r = gen.generate(GenerationParams(prompt=prompt, seed=seed, steps=3, width=32, height=32))[0]
    return np.asarray(r.image).astype(np.int32), r.infotext


def test_tags_switch_loras_on_off_and_reweight_without_reloading(gen, caplog):
    base, info0 = image(gen, "a red circle")
    with caplog.at_level(logging.WARNING):
        on, info1 = image(gen, "a red circle <lora:ink:1>")
    assert not any("not applied" in r.message for r in caplog.records)
    assert np.abs(on - base).max() > 0
    assert "<lora:ink:1>" in info1.splitlines()[0] and "Lora hashes: " in info1 and "ink: " in info1
    assert "Lora hashes" not in info0
    loaded = dict(gen.loras.stack.loaded)
    half, info2 = image(gen, "a red circle <lora:styles/ink:0.5>")   # path relative to the folder works too
    assert np.abs(half - on).max() > 0 and np.abs(half - base).max() > 0
    off, info3 = image(gen, "a red circle")
    assert np.array_equal(off, base) and "Lora hashes" not in info3
    again, _ = image(gen, "a red circle <lora:ink:1>")
    assert np.array_equal(again, on)
    assert dict(gen.loras.stack.loaded) == loaded  # loaded once, kept; only weights changed


def test_fixed_loras_and_their_folders(setup):
    from sdtune.generate import Generator

    g = Generator(str(setup["model"]), loras=[(setup["shape"], 1.0)])   # no lora_dirs: the --lora folder is searched
    fixed, _ = image(g, "a red circle")
    same, _ = image(g, "a red circle <lora:heart:0>")  # the same file by tag with weight 0: weights add up
    assert np.array_equal(fixed, same)
    both, info = image(g, "a red circle <lora:heart:1>")
    assert np.abs(both - fixed).max() > 0
    back, _ = image(g, "a red circle")
    assert np.array_equal(back, fixed)   # the fixed LoRA stays on when the tags go


def test_two_loras_by_tag(gen):
    a, _ = image(gen, "a red circle <lora:ink:1>")
    with pytest.raises(SdtuneError, match="<lora:heart> not found"):
        image(gen, "a red circle <lora:ink:1> <lora:heart:1>")   # not under --lora-dir
    gen.lora_dirs.append(gen.lora_dirs[0].parent / "other")
    try:
        ab, info = image(gen, "a red circle <lora:ink:1> <lora:heart:1>")
        assert np.abs(ab - a).max() > 0 and "ink: " in info and "heart: " in info
    finally:
        gen.lora_dirs.pop()
        image(gen, "a red circle")


def test_unknown_tag_names_near_files(gen):
    with pytest.raises(SdtuneError, match="<lora:inc> not found .*did you mean ink"):
        image(gen, "a red circle <lora:inc:1>")


@pytest.mark.parametrize("tag", ["<lora:ink:0:1>", "<lora:ink:1:0>", "<lora:ink:te=0.5>", "<lora:ink:1:unet=0>",
                                 "<lora:ink:1:1:8>"])
def test_separate_text_encoder_and_unet_weights_are_refused_not_ignored(gen, tag):
    """A1111 reads <lora:name:te:unet>; sdtune applies one weight to both, so such a tag is an error that names it
    (it used to be read as its first number, a different image from A1111's)."""
    with pytest.raises(SdtuneError, match="separate text-encoder and UNet weights"):
        image(gen, f"a red circle {tag}")


def test_the_same_weight_twice_is_one_weight(gen):
    one, _ = image(gen, "a red circle <lora:ink:0.5>")
    twice, _ = image(gen, "a red circle <lora:ink:0.5:0.5>")
    assert np.array_equal(one, twice)


def test_no_folder_given(setup):
    from sdtune.generate import Generator

    g = Generator(str(setup["model"]))
    with pytest.raises(SdtuneError, match="pass --lora-dir"):
        image(g, "a red circle <lora:ink:1>")


def test_cli_generate_with_lora_dir(setup, tmp_path, capsys):
    from sdtune.cli.testing import run_cli
    from sdtune.generate.pnginfo import read_png_infotext

    def run(args):
        r = run_cli(args, capsys)
        return r.code, r.text

    code, out = run(["generate", "a red circle <lora:ink:0.8>", "--model", str(setup["model"]), "--lora-dir",
                     str(setup["dir"] / "loras"), "--steps", "2", "--seed", "1", "--out", str(tmp_path / "o")])
    assert code == 0, out
    png = next((tmp_path / "o").glob("*.png"))
    text = read_png_infotext(png)
    assert text.startswith("a red circle <lora:ink:0.8>") and "Lora hashes:" in text
    code, out = run(["generate", "a red circle", "--model", str(setup["model"]), "--lora-dir",
                     str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert code != 0 and "--lora-dir" in out and "no such folder" in out
