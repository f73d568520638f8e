"""Applying LoRAs: several at once with their own weights, switching without reloading, weight 0 = the base model
bit for bit, equality with diffusers' own adapters and with merging, family checks, the Generator, prompt tags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtune.adapters.lora import read_lora, save_lora
from sdtune.adapters.lora.apply import PipelineLoras
from sdtune.adapters.lora.merge import merge_loras
from sdtune.adapters.lora.testing import KOHYA_UNET, TEXT, random_network
from sdtune.errors import SdtuneError
from sdtune.models.testing import tiny_pipeline, unet_inputs

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning", "ignore::RuntimeWarning"),
              pytest.mark.usefixtures("hash_cache")]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two SD1 LoRAs for the tiny architecture: A (kohya, UNet + text encoder + conv), B (diffusers, UNet only),
    and an SDXL LoRA."""
    d = tmp_path_factory.mktemp("loras")
    pipe = tiny_pipeline("sd1")
    a = save_lora(random_network(pipe, unet=KOHYA_UNET + ("conv1",), text=TEXT, seed=1), d / "style_a.safetensors")
    b = save_lora(random_network(pipe, unet=("to_k", "to_v"), seed=2, rank=2, alpha=2), d / "b.safetensors",
                  format="diffusers")
    xl = save_lora(random_network(tiny_pipeline("sdxl"), seed=3), d / "xl.safetensors")
    return {"a": a, "b": b, "xl": xl, "dir": d}


def unet_out(pipe):
    with torch.no_grad():
        return pipe.unet(**unet_inputs(pipe.unet)).sample


def text_out(pipe):
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73])
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_switching_weights_without_reloading(files):
    pipe = tiny_pipeline("sd1", seed=5)
    base_u, base_t = unet_out(pipe), text_out(pipe)
    weights_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    loras = PipelineLoras(pipe)
    loras.set([(files["a"], 0.8), (files["b"], 0.5)])
    both = unet_out(pipe)
    assert (both - base_u).abs().max() > 1e-3 and (text_out(pipe) - base_t).abs().max() > 1e-4
    adapters = dict(loras.loaded)
    loras.set([(files["a"], 0.0), (files["b"], 0)])
    assert torch.equal(unet_out(pipe), base_u) and torch.equal(text_out(pipe), base_t)  # weight 0: bit-identical
    loras.set([(files["a"], 0.8)])
    only_a = unet_out(pipe)
    loras.set([])
    assert torch.equal(unet_out(pipe), base_u) and torch.equal(text_out(pipe), base_t)
    loras.set([(files["b"], 0.5), (files["a"], 0.8)])
    assert torch.equal(unet_out(pipe), both)  # order does not matter, nothing drifted
    loras.set([(files["a"], -0.8)])
    assert not torch.equal(unet_out(pipe), only_a)
    assert loras.loaded == adapters  # every file was loaded once
    base_weights = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, weights_before[k.replace(".base_layer", "")]) for k, v in base_weights.items())
    loras.unload()
    assert torch.equal(unet_out(pipe), base_u) and not any("lora" in k for k in pipe.unet.state_dict())


def test_same_result_as_diffusers_adapters_and_as_merging(files):
    pipe = tiny_pipeline("sd1", seed=5)
    PipelineLoras(pipe).set([(files["a"], 0.8), (files["b"], 0.5)])
    ours = unet_out(pipe), text_out(pipe)

    ref = tiny_pipeline("sd1", seed=5)
    ref.load_lora_weights(str(files["dir"]), weight_name="style_a.safetensors", adapter_name="style")
    ref.load_lora_weights(str(files["dir"]), weight_name="b.safetensors", adapter_name="other")
    ref.set_adapters(["style", "other"], [0.8, 0.5])
    torch.testing.assert_close(unet_out(ref), ours[0], rtol=1e-5, atol=1e-5)  # summation order differs
    torch.testing.assert_close(text_out(ref), ours[1], rtol=1e-5, atol=1e-5)

    merged = tiny_pipeline("sd1", seed=5)
    report = merge_loras(merged, [(files["a"], 0.8), (files["b"], 0.5)])
    assert [(m.name, m.weight) for m in report] == [("style_a", 0.8), ("b", 0.5)]
    torch.testing.assert_close(unet_out(merged), ours[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_out(merged), ours[1], rtol=1e-4, atol=1e-5)


def test_wrong_family_and_architecture_are_refused(files):
    pipe = tiny_pipeline("sd1")
    with pytest.raises(SdtuneError, match="xl.safetensors is a SDXL LoRA but .* is SD1; use a LoRA trained for SD1"):
        PipelineLoras(pipe).set([(files["xl"], 1.0)])
    sd2 = tiny_pipeline("sd2")
    with pytest.raises(SdtuneError, match="SD1 LoRA but .* is SD2"):
        merge_loras(sd2, [(files["a"], 1.0)])
    net = read_lora(files["a"])
    net.family = None  # without the metadata, the module check still refuses it
    with pytest.raises(SdtuneError, match="do not fit|match no layer"):
        PipelineLoras(sd2).set([(net, 1.0)])
    assert not any("lora" in k for k in sd2.unet.state_dict())


def test_generator_loras_and_infotext(files, tmp_path):
    from sdtune.adapters.lora.tags import lora_short_hash
    from sdtune.generate import GenerationParams, Generator
    from sdtune.generate.conditioning import encode_with_pipeline
    from sdtune.models import LoadedModel

    pipe = tiny_pipeline("sd1", seed=5)
    loaded = LoadedModel(pipe=pipe, family="sd1", prediction_type="epsilon", name="tiny-random", hash="0123456789",
                         source=Path("."), device=torch.device("cpu"), dtype=torch.float32)
    params = GenerationParams(prompt="a red circle", steps=2, seed=3, width=16, height=16, cfg_scale=3)
    gen = Generator(loaded, encode_prompt=encode_with_pipeline)
    base = gen.generate(params)[0]
    gen.set_loras([(files["a"], 0.9), (files["b"], 0.4)])
    with_loras = gen.generate(params)[0]
    assert with_loras.image.tobytes() != base.image.tobytes()
    field = f'Lora hashes: "style_a: {lora_short_hash(files["a"])}, b: {lora_short_hash(files["b"])}"'
    assert field in with_loras.infotext and with_loras.infotext.index(field) < with_loras.infotext.index("Version:")
    gen.set_loras([(files["a"], 0), (files["b"], 0)])
    off = gen.generate(params)[0]
    assert off.image.tobytes() == base.image.tobytes() and "Lora hashes" not in off.infotext
    assert gen.model.pipe is pipe

    gen2 = Generator(loaded, encode_prompt=encode_with_pipeline, loras=[(str(files["a"]), 0.9), (files["b"], 0.4)])
    assert gen2.generate(params)[0].image.tobytes() == with_loras.image.tobytes()


def test_lora_hash_is_a1111s(files):
    import hashlib

    from sdtune.adapters.lora.tags import lora_short_hash

    data = Path(files["a"]).read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert lora_short_hash(files["a"]) == hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_infotext_field_and_lora_args():
    from sdtune.adapters.lora.tags import lora_hashes_value, parse_lora_arg
    from sdtune.generate.pnginfo import add_infotext_field

    text = "a cat\nNegative prompt: dog\nSteps: 2, Seed: 1, Version: sdtune 0.1.0"
    value = lora_hashes_value([("my:lora", "abc"), ("b", "def")])
    assert add_infotext_field(text, "Lora hashes", value) == \
        'a cat\nNegative prompt: dog\nSteps: 2, Seed: 1, Lora hashes: "mylora: abc, b: def", Version: sdtune 0.1.0'
    assert add_infotext_field(text, "Lora hashes", None) == text
    assert parse_lora_arg("x/y.safetensors:0.5") == ("x/y.safetensors", 0.5)
    assert parse_lora_arg("x/y.safetensors") == ("x/y.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\y.safetensors") == (r"C:\loras\y.safetensors", 1.0)
    assert parse_lora_arg("y.safetensors:-1") == ("y.safetensors", -1.0)


def test_resolve_prompt_tags(tmp_path):
    from sdtune.adapters.lora.tags import resolve_lora_tags
    from sdtune.prompts.extra_networks import extract_extra_networks

    (tmp_path / "one" / "styles").mkdir(parents=True)
    (tmp_path / "two").mkdir()
    for f in ("one/Ink.safetensors", "one/styles/watercolor.safetensors", "two/Ink.safetensors",
              "two/heart.pt", "two/notes.txt"):
        (tmp_path / f).write_bytes(b"x")
    _, tags = extract_extra_networks("a cat <lora:Ink:0.7> <lora:styles/watercolor> <hypernet:x:1> <lora:HEART:.5>")
    got = resolve_lora_tags(tags, [tmp_path / "one", tmp_path / "two"])
    assert got == [(tmp_path / "one/Ink.safetensors", 0.7), (tmp_path / "one/styles/watercolor.safetensors", 1.0),
                   (tmp_path / "two/heart.pt", 0.5)]
    assert resolve_lora_tags([("watercolor", 0.2)], [tmp_path / "one"]) == \
        [(tmp_path / "one/styles/watercolor.safetensors", 0.2)]
    with pytest.raises(SdtuneError, match="<lora:inc> not found in .*did you mean Ink"):
        resolve_lora_tags([("inc", 1)], [tmp_path / "one", tmp_path / "two"])
    with pytest.raises(SdtuneError, match="no LoRA folder"):
        resolve_lora_tags([("Ink", 1)], [])
    assert resolve_lora_tags([], []) == []
