"""`--negative-lora`: a LoRA active in classifier-free guidance's unconditional pass only (UNet rows and the negative
prompt's text encoding), checked row by row against the UNet with and without the LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtune.adapters.lora import save_lora
from sdtune.adapters.lora.testing import KOHYA_UNET, TEXT, random_network
from sdtune.models.testing import tiny_pipeline

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning", "ignore::RuntimeWarning"),
              pytest.mark.usefixtures("hash_cache")]
torch.set_num_threads(1)


def _loaded(seed: int = 5):
    from sdtune.models import LoadedModel

    pipe = tiny_pipeline("sd1", seed=seed)
    return LoadedModel(pipe=pipe, family="sd1", prediction_type="epsilon", name="tiny-random", hash="0123456789",
                       source=Path("."), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("neg")
    pipe = tiny_pipeline("sd1")
    unet_only = save_lora(random_network(pipe, unet=KOHYA_UNET, seed=11, scale=0.3), d / "wrong.safetensors")
    with_text = save_lora(random_network(pipe, unet=KOHYA_UNET, text=TEXT, seed=12, scale=0.3), d / "te.safetensors")
    return {"unet": unet_only, "te": with_text}


def test_unconditional_rows_run_with_the_lora_and_the_rest_without(lora_files):
    from sdtune.generate import Generator
    from sdtune.generate.conditioning import encode_with_pipeline
    from sdtune.generate.negative_pass import unconditional_rows_with
    from sdtune.models.testing import unet_inputs

    gen = Generator(_loaded(), encode_prompt=encode_with_pipeline, negative_loras=[(lora_files["unet"], 0.8)])
    unet = gen.model.pipe.unet
    one = unet_inputs(unet)
    inputs = {k: torch.cat([v, v + 0.5]) if isinstance(v, torch.Tensor) and v.ndim else v for k, v in one.items()}
    with torch.no_grad():
        base = unet(**inputs).sample
        with gen.loras.negative_pass():
            with_lora = unet(**inputs).sample
        with unconditional_rows_with(gen.model.pipe, 1, gen.loras.negative_pass):
            split = unet(**inputs).sample
        after = unet(**inputs).sample
    assert not torch.allclose(base, with_lora, atol=1e-4)  # the LoRA does change the UNet
    torch.testing.assert_close(split[:1], with_lora[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split[1:], base[1:], rtol=1e-5, atol=1e-6)
    assert torch.equal(after, base)  # the forward and the adapters are back as they were
    assert "forward" not in vars(unet)


def test_generation_with_a_negative_lora(lora_files):
    from sdtune.generate import GenerationParams, Generator
    from sdtune.generate.conditioning import encode_with_pipeline

    params = GenerationParams(prompt="a red circle", negative_prompt="wrong", steps=2, seed=3, width=16, height=16,
                              cfg_scale=5)
    gen = Generator(_loaded(), encode_prompt=encode_with_pipeline)
    base = gen.generate(params)[0]
    gen.set_loras([(lora_files["te"], 1)])
    both_passes = gen.generate(params)[0]
    gen.set_loras([])
    gen.set_negative_loras([(lora_files["te"], 1)])
    negative_only = gen.generate(params)[0]
    assert len({base.image.tobytes(), both_passes.image.tobytes(), negative_only.image.tobytes()}) == 3
    assert 'Negative LoRA: "te:1"' in negative_only.infotext and "Negative Lora hashes" in negative_only.infotext
    assert "Lora hashes: " not in negative_only.infotext.replace("Negative Lora hashes", "")
    gen.set_negative_loras([(lora_files["te"], 0)])
    assert gen.generate(params)[0].image.tobytes() == base.image.tobytes()  # weight 0 = the base model, bit for bit
    gen.set_negative_loras([])
    assert gen.generate(params)[0].image.tobytes() == base.image.tobytes()
    assert "Negative LoRA" not in gen.generate(params)[0].infotext


def test_negative_prompt_is_encoded_under_the_text_encoder_lora(lora_files):
    """The conditional embeddings stay the base text encoder's; the negative ones are the LoRA'd encoder's."""
    from sdtune.generate import Generator
    from sdtune.generate.conditioning import encode_with_pipeline

    gen = Generator(_loaded(), encode_prompt=encode_with_pipeline, negative_loras=[(lora_files["te"], 1)])
    pipe = gen.model.pipe
    kw = dict(num_images=1, do_cfg=True, clip_skip=1)
    base = encode_with_pipeline(pipe, "a red circle", "wrong", **kw)
    with gen.loras.negative_pass():
        lora = encode_with_pipeline(pipe, "a red circle", "wrong", **kw)
    mixed = base.with_negative_of(lora)
    assert not torch.allclose(base.negative_prompt_embeds, lora.negative_prompt_embeds)
    assert torch.equal(mixed.prompt_embeds, base.prompt_embeds)
    assert torch.equal(mixed.negative_prompt_embeds, lora.negative_prompt_embeds)
    assert gen.loras.negative_touches("text_encoder") and gen.loras.negative_touches("unet")


def test_cli_refuses_a_negative_lora_without_guidance_or_file(lora_files, tmp_path, capsys):
    from sdtune.cli.testing import run_cli

    missing = run_cli(["generate", "a red circle", "--negative-lora", str(tmp_path / "nope.safetensors"),
                       "--out", str(tmp_path / "o")], capsys)
    assert missing.code == 2 and "--negative-lora" in missing.err and "no such file" in missing.err
    no_cfg = run_cli(["generate", "a red circle", "--negative-lora", str(lora_files["unet"]), "--cfg", "1",
                      "--out", str(tmp_path / "o")], capsys)
    assert no_cfg.code == 2 and "--cfg above 1" in no_cfg.err
    assert not (tmp_path / "o").exists()


def test_cli_writes_the_negative_lora_into_the_infotext(tmp_path, capsys):
    from sdtune.cli.testing import run_cli
    from sdtune.generate.pnginfo import read_png_infotext
    from sdtune.models import load_model

    wrong = save_lora(random_network(load_model("tiny"), seed=4), tmp_path / "wrong.safetensors")
    res = run_cli(["generate", "a red circle", "--negative", "wrong", "--negative-lora", f"{wrong}:0.7",
                   "--steps", "2", "--seed", "1", "--out", str(tmp_path / "o")], capsys)
    assert res.code == 0, res.err
    (png,) = (tmp_path / "o").glob("*.png")
    assert 'Negative LoRA: "wrong:0.7"' in read_png_infotext(png)
