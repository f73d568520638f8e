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


@pytest.fixture(scope="module")
def ink_parts(setup):
    """The ink LoRA split in two files: its text-encoder modules only, and its UNet modules only."""
    from safetensors.torch import load_file, save_file

    from sdtune.formats.safe_io import read_safetensors_metadata

    tensors, meta = load_file(str(setup["style"])), read_safetensors_metadata(setup["style"])
    parts = setup["dir"] / "loras" / "parts"
    parts.mkdir(exist_ok=True)
    for part, prefix in (("te", "lora_te"), ("unet", "lora_unet")):
        mine = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        assert mine and len(mine) < len(tensors)
        save_file(mine, str(parts / f"ink_{part}.safetensors"), metadata=meta)


@pytest.mark.parametrize("split,same_as", [
    ("0:1", "<lora:ink_unet:1>"), ("1:0", "<lora:ink_te:1>"), ("te=0:unet=1", "<lora:ink_unet:1>"),
    ("0.5:0.5", "<lora:ink:0.5>"), ("0:0", ""), ("0.7:unet=0", "<lora:ink_te:0.7>"),
])
def test_separate_text_encoder_and_unet_weights_as_a1111_reads_them(gen, ink_parts, split, same_as):
    """<lora:name:te:unet>: each component at its own weight, bit for bit the same as a file holding only that
    component's modules (weight 0: that component's base layers)."""
    split_image, info = image(gen, f"a red circle <lora:ink:{split}>")
    expected, _ = image(gen, f"a red circle {same_as}")
    assert np.array_equal(split_image, expected)
    assert f"<lora:ink:{split}>" in info.splitlines()[0]  # the infotext keeps the tag as written


def test_each_part_of_the_split_file_changes_the_image(gen, ink_parts):
    """What makes the comparisons above mean something: base, text-encoder part, UNet part and both all differ."""
    images = [image(gen, f"a red circle {t}")[0] for t in ("", "<lora:ink_te:1>", "<lora:ink_unet:1>", "<lora:ink:1>")]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])


@pytest.mark.parametrize("tag,says", [("<lora:ink:1:1:8>", "third number"), ("<lora:ink:1:dyn=8>", "dyn="),
                                      ("<lora:ink:1:unet=abc>", "not a number"), ("<lora:ink:1:foo=2>", "names"),
                                      ("<lora:ink:0,5>", "'0,5' is not a number"), ("<lora:ink:abc>", "not a number")])
def test_lora_tag_arguments_sdtune_cannot_apply_are_refused(gen, tag, says):
    with pytest.raises(SdtuneError, match=says):
        image(gen, f"a red circle {tag}")


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
