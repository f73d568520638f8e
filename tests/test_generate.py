"""Generator and `sdtune generate`: seeds, reproducibility, SDXL refiner, files, --from-png, bad input.

Models are tiny and random; 2-4 steps. Torch runs single-threaded here: on a busy 2-core machine two OpenMP
threads at low priority are ~50x slower than one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli.testing import exit_code as cli
from sdtune.errors import SdtuneError
from sdtune.generate import GenerationParams, Generator, encode_with_pipeline, read_png_infotext

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("hash_cache")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Like conftest's `tiny_random_dir`, but writes the tokenizer first (build_components only writes it when
    given no folder). Switch to `tiny_random_dir` once that fixture builds."""
    from diffusers import StableDiffusionPipeline

    from sdtune.toy.tiny import build_components, write_tokenizer

    out = tmp_path_factory.mktemp("tiny_random_gen")
    write_tokenizer(out / "tokenizer")
    comps = build_components(seed=0, tokenizer_dir=out / "tokenizer")
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def gen(model_dir) -> Generator:
    return Generator(str(model_dir), device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# -- Generator --------------------------------------------------------------------------------------------------

def test_native_size_seeds_and_infotext(gen):
    images = gen.generate(GenerationParams(prompt="a red circle", steps=2, seed=10, batch_count=2))
    assert [im.seed for im in images] == [10, 11]
    assert all(im.image.size == (64, 64) for im in images)
    assert not np.array_equal(pixels(images[0].image), pixels(images[1].image))
    text = images[1].infotext
    assert text.startswith("a red circle\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 11, Size: 64x64, ")
    assert f"Model hash: {gen.model.hash}, Model: {gen.model.name}" in text


def test_bit_exact_repeat_and_seed_plus_i(gen):
    """Image i of a run is the image of seed+i alone, bit for bit (same batch size, same machine)."""
    p = GenerationParams(prompt="a blue square", negative_prompt="red", steps=2, seed=3, batch_count=2,
                         sampler="Euler a", width=32, height=40)
    run = gen.generate(p)
    again = gen.generate(p.replace(seed=4, batch_count=1))
    assert run[1].image.size == (32, 40)
    assert np.array_equal(pixels(run[1].image), pixels(again[0].image))


def test_batch_composition_changes_only_rounding(gen):
    """Per-image CPU generators: an image's noise (initial and ancestral) does not depend on its batch mates."""
    p = GenerationParams(prompt="a green circle", steps=2, seed=20, sampler="Euler a", width=32, height=32)
    batched = gen.generate(p.replace(batch_size=2))
    single = gen.generate(p.replace(seed=21))
    assert batched[1].seed == 21 and batched[1].batch_pos == 1 and "Batch size: 2, Batch pos: 1" in batched[1].infotext
    assert np.abs(pixels(batched[1].image) - pixels(single[0].image)).max() <= 2


def test_inference_speedups_keep_images_and_leave_a_given_model_alone(gen, model_dir):
    """A model the generator loads itself gets channels-last weights and signature-cached processors (see
    generate/inference.py); the images stay those of the plain model up to float rounding. A model handed in
    (the trainer's) is not touched."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sdtune.models import load_model

    plain_model = load_model(str(model_dir), device="cpu")
    plain = Generator(plain_model)
    kinds = {type(m.processor) for m in plain_model.pipe.unet.modules() if hasattr(m, "processor")}
    assert kinds == {AttnProcessor2_0}
    assert plain_model.pipe.unet.conv_in.weight.is_contiguous()
    fast_kinds = {type(m.processor).__name__ for m in gen.model.pipe.unet.modules() if hasattr(m, "processor")}
    assert fast_kinds == {"SignatureCachedAttnProcessor"}
    assert gen.model.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    params = GenerationParams(prompt="a red circle", steps=6, seed=3, width=64, height=64)
    diff = np.abs(pixels(gen.generate(params)[0].image) - pixels(plain.generate(params)[0].image))
    assert diff.max() <= 3, diff.max()


def test_random_seed_is_recorded(gen):
    im = gen.generate(GenerationParams(prompt="x", steps=1, width=32, height=32))[0]
    assert 0 <= im.seed < 2**32 and f"Seed: {im.seed}," in im.infotext and im.params.seed == im.seed


def test_prompt_encoder_hook_is_used(model_dir):
    calls = []

    def encoder(pipe, prompt, negative_prompt, **kw):
        calls.append((prompt, negative_prompt, kw["num_images"]))
        return encode_with_pipeline(pipe, prompt, negative_prompt, **kw)

    g = Generator(str(model_dir), device="cpu", encode_prompt=encoder)
    g.generate(GenerationParams(prompt="p", negative_prompt="n", steps=1, batch_size=2, width=32, height=32, seed=1))
    assert calls == [("p", "n", 2)]


def test_bad_params_raise_before_running(gen):
    for bad in (dict(width=60), dict(steps=0), dict(sampler="nope"), dict(refiner="x")):
        with pytest.raises(SdtuneError):
            gen.generate(GenerationParams(prompt="x", **bad))


# -- SDXL base + refiner (ensemble of experts) -----------------------------------------------------------------

def _tiny_sdxl(tmp: Path):
    """Random tiny SDXL base and refiner pipelines, built from configs (16x16 images, 8x8 latents)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdtune.models import LoadedModel
    from sdtune.toy.tiny import write_tokenizer

    write_tokenizer(tmp / "tok")
    tok = CLIPTokenizer.from_pretrained(str(tmp / "tok"))
    torch.manual_seed(0)
    width, proj, time_dim = 16, 16, 8

    def text_config():
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=proj,
                              max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def unet(cross_dim: int, n_time_ids: int):
        return UNet2DConditionModel(
            sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=cross_dim,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=n_time_ids * time_dim + proj)

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    te1, te2 = CLIPTextModel(text_config()), CLIPTextModelWithProjection(text_config())
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet(2 * width, 6), scheduler=sched)
    refiner = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                               tokenizer_2=tok, unet=unet(width, 5), scheduler=sched,
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    cpu = torch.device("cpu")

    def loaded(pipe, family, name, h):
        return LoadedModel(pipe=pipe, family=family, prediction_type="epsilon", name=name, hash=h,
                           source=tmp / name, device=cpu, dtype=torch.float32)

    return loaded(base, "sdxl", "tinyxl", "0123456789"), loaded(refiner, "sdxl-refiner", "tinyxl-ref", "abcdef0123")


def test_sdxl_refiner_ensemble_of_experts(tmp_path):
    base, refiner = _tiny_sdxl(tmp_path)
    calls = {"base": 0, "refiner": 0}
    base.pipe.unet.register_forward_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1))
    refiner.pipe.unet.register_forward_hook(lambda *a: calls.__setitem__("refiner", calls["refiner"] + 1))
    g = Generator(base, refiner=refiner)
    assert g.native_size() == (16, 16)
    p = GenerationParams(prompt="a red circle", steps=4, seed=5, sampler="Euler", refiner="tinyxl-ref",
                         refiner_start=0.5, batch_size=2)
    images = g.generate(p)
    assert [im.image.size for im in images] == [(16, 16)] * 2
    assert calls == {"base": 2, "refiner": 2}  # 4 steps split at 0.5; CFG halves share one UNet call
    assert "Refiner: tinyxl-ref [abcdef0123], Refiner switch at: 0.5" in images[0].infotext
    again = g.generate(p)
    assert np.array_equal(pixels(images[1].image), pixels(again[1].image))
    plain = g.generate(p.replace(refiner=None, batch_size=1))
    assert "Refiner" not in plain[0].infotext
    with pytest.raises(SdtuneError, match="refiner"):
        Generator(refiner)


# -- CLI --------------------------------------------------------------------------------------------------------

def test_cli_writes_numbered_pngs_and_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "a red circle", "--model", str(model_dir), "--steps", "2", "--width", "32", "--height",
            "32", "--device", "cpu", "--out", str(out)]
    assert cli(args + ["--seed", "7", "-n", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"seed 7: {out / '00000-7.png'}", f"seed 8: {out / '00001-8.png'}", f"grid: {out / 'grid-0000.png'}"]
    assert Image.open(out / "grid-0000.png").size == (64, 32)
    assert cli(args + ["--seed", "7"]) == 0  # numbering continues; nothing is overwritten
    assert capsys.readouterr().out.strip() == f"seed 7: {out / '00002-7.png'}"
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "00001-8.png", "00002-7.png", "grid-0000.png"]
    assert np.array_equal(pixels(Image.open(out / "00000-7.png")), pixels(Image.open(out / "00002-7.png")))


def test_cli_saves_each_image_as_its_batch_ends_so_an_interrupt_keeps_them(model_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C during `generate -n 60` used to lose every image: they were saved only after the last batch."""
    out = tmp_path / "out"
    real = Generator.generate
    calls = {"batches": 0}

    def interrupted_after_two(self, params, **kw):
        def progress(done, total):
            if done and done % params.steps == 0:
                calls["batches"] += 1
                if calls["batches"] == 3:  # the third batch has finished sampling: Ctrl-C before it is saved
                    raise KeyboardInterrupt
        return real(self, params, **{**kw, "progress": progress})

    monkeypatch.setattr(Generator, "generate", interrupted_after_two)
    args = ["generate", "a red circle", "--model", str(model_dir), "--steps", "2", "--width", "32", "--height", "32",
            "--device", "cpu", "--out", str(out), "--seed", "7", "-n", "5"]
    assert cli(args) == 130
    assert sorted(p.name for p in out.iterdir()) == ["00000-7.png", "00001-8.png"]
    assert "seed 8: " in capsys.readouterr().out


def test_cli_prompt_option_equals_the_argument(model_dir, tmp_path, capsys):
    common = ["--model", str(model_dir), "--steps", "2", "--width", "32", "--height", "32", "--device", "cpu",
              "--seed", "3", "--negative-prompt", "blue"]
    assert cli(["generate", "a red circle", *common, "--out", str(tmp_path / "a")]) == 0
    assert cli(["generate", "--prompt", "a red circle", *common, "--out", str(tmp_path / "b")]) == 0
    a, b = (Image.open(tmp_path / d / "00000-3.png") for d in "ab")
    assert np.array_equal(pixels(a), pixels(b))
    assert "Negative prompt: blue" in a.info["parameters"]
    capsys.readouterr()
    assert cli(["generate", "x", "-p", "y", *common, "--out", str(tmp_path / "c")]) == 2
    assert "give the prompt once" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cli_from_png_reproduces_bit_for_bit(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["generate", "a yellow star", "--negative", "blue, dark", "--model", str(model_dir), "--steps", "3",
                "--sampler", "euler_a", "--cfg", "5", "--seed", "42", "-b", "2", "--width", "32", "--height", "32",
                "--device", "cpu", "--out", str(out), "--no-grid"]) == 0
    capsys.readouterr()
    src = out / "00001-43.png"  # second image of a batch of two
    text = read_png_infotext(src)
    assert "Negative prompt: blue, dark\nSteps: 3, Sampler: Euler a, CFG scale: 5, Seed: 43," in text
    again = tmp_path / "again"
    assert cli(["generate", "--from-png", str(src), "--model", str(model_dir), "--device", "cpu",
                "--out", str(again)]) == 0
    assert capsys.readouterr().out.strip() == f"seed 43: {again / '00000-43.png'}"
    assert np.array_equal(pixels(Image.open(src)), pixels(Image.open(again / "00000-43.png")))
    assert read_png_infotext(again / "00000-43.png") == text
    # options on the command line override the PNG's
    assert cli(["generate", "--from-png", str(src), "--model", str(model_dir), "--device", "cpu", "--steps", "2",
                "--seed", "9", "--out", str(again)]) == 0
    assert capsys.readouterr().out.strip() == f"seed 9: {again / '00001-9.png'}"
    new = read_png_infotext(again / "00001-9.png")
    assert new.startswith("a yellow star\nNegative prompt: blue, dark\nSteps: 2, Sampler: Euler a, CFG scale: 5, "
                          "Seed: 9,") and "Batch" not in new


def _plain_png(tmp_path: Path) -> str:
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    return str(path)


@pytest.mark.parametrize("extra,message", [
    (["x", "--width", "100"], "width 100 is not a multiple of 8"),
    (["x", "--steps", "-1"], "steps -1 is too small"),
    (["x", "--sampler", "Euler z"], "unknown sampler 'Euler z'"),
    (["x", "--cfg", "nan"], "CFG scale"),
    (["x", "--model", "MISSING"], "not found"),
    (["--from-png", "PLAIN"], "no A1111 'parameters' text chunk"),
    ([], "no prompt given"),
])
def test_cli_bad_input_one_line_error_nothing_written(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    extra = [a.replace("MISSING", str(tmp_path / "nope")).replace("PLAIN", _plain_png(tmp_path)) for a in extra]
    model = [] if "--model" in extra else ["--model", str(model_dir)]
    code = cli(["generate", *extra, *model, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_cli_list_samplers(capsys):
    assert cli(["generate", "--list-samplers"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert "DPM++ 2M Karras" in names and "Euler a" in names


def test_make_grid_layout():
    from PIL import Image

    from sdtune.generate.grid import make_grid

    ims = [Image.new("RGB", (8, 6), (i * 30, 0, 0)) for i in range(8)]
    assert make_grid(ims).size == (3 * 8, 3 * 6)             # as square as possible
    sheet = make_grid(ims, cols=4)
    assert sheet.size == (4 * 8, 2 * 6)
    assert sheet.getpixel((8 * 3, 6)) == (7 * 30, 0, 0)      # row 2, column 4: the 8th image
