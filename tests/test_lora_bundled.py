"""Textual Inversion embeddings bundled in a LoRA file, by A1111's rule: keys `bundle_emb.<name>.string_to_param.*`
(SD1/SD2) or `bundle_emb.<name>.clip_l` / `.clip_g` (SDXL); the name is the second part; the embedding is usable by
that name while the LoRA is in use. Before, such a file was refused as a whole ("not LoRA modules")."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import random_network
    from sdtune.adapters.textual_inversion.files import Embedding, write_embedding
    from sdtune.models import load_model

    d = tmp_path_factory.mktemp("bundled")
    pipe = load_model("tiny").pipe
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    plain = random_network(pipe, seed=1, scale=0.3)
    (d / "plain").mkdir()
    (d / "bundled").mkdir()
    (d / "emb").mkdir()
    save_lora(plain, d / "plain" / "style.safetensors")
    plain.embeddings = {"shiny": {"*": vectors}}
    save_lora(plain, d / "bundled" / "style.safetensors")
    write_embedding(Embedding(name="shiny", vectors={"*": vectors}), d / "emb" / "shiny.safetensors")
    return {"dir": d, "vectors": vectors}


def test_written_with_a1111_keys_and_read_back(files):
    from sdtune.adapters.lora import read_lora

    sd = load_file(files["dir"] / "bundled" / "style.safetensors")
    assert torch.equal(sd["bundle_emb.shiny.string_to_param.*"], files["vectors"])
    net = read_lora(files["dir"] / "bundled" / "style.safetensors")  # strict: no unknown keys
    assert torch.equal(net.embeddings["shiny"]["*"], files["vectors"]) and net.modules


def test_sdxl_keys():
    from sdtune.adapters.lora.bundled import bundle_keys, split_bundled

    vecs = {"x": {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}}
    keys = bundle_keys(vecs)
    assert sorted(keys) == ["bundle_emb.x.clip_g", "bundle_emb.x.clip_l"]
    rest, found = split_bundled({**keys, "lora_unet_a.lora_down.weight": torch.ones(1)})
    assert list(rest) == ["lora_unet_a.lora_down.weight"] and torch.equal(found["x"]["clip_g"], vecs["x"]["clip_g"])


def test_the_bundled_embedding_works_exactly_like_a_separate_file_while_the_lora_is_used(files):
    from sdtune.generate import GenerationParams, Generator

    d = files["dir"]
    prompt = "a red shiny circle on a white background <lora:style:1>"
    params = GenerationParams(prompt=prompt, steps=3, seed=5)
    bundled = Generator("tiny", lora_dirs=[d / "bundled"])
    separate = Generator("tiny", lora_dirs=[d / "plain"], embeddings=[d / "emb"])
    a = bundled.generate(params)[0].image.tobytes()
    assert a == separate.generate(params)[0].image.tobytes()
    assert "shiny" in bundled.embeddings.registry
    without_lora = bundled.generate(params.replace(prompt="a red shiny circle on a white background"))
    assert "shiny" not in bundled.embeddings.registry  # only while its LoRA is in use, as in A1111
    assert without_lora[0].image.tobytes() != a


def test_info_lists_the_bundled_embeddings(files):
    from sdtune.formats.identify import identify

    fi = identify(files["dir"] / "bundled" / "style.safetensors")
    assert fi.kind == "lora" and fi.details["bundled_embeddings"] == {"shiny": 2}
    assert fi.details["modules"] == identify(files["dir"] / "plain" / "style.safetensors").details["modules"]
    assert "bundled embeddings: shiny (2 vector(s))" in fi.summary


def test_converting_to_diffusers_writes_the_bundled_embeddings_beside_it(files, tmp_path, capsys):
    """A PEFT (diffusers) LoRA file has no place for bundled words (diffusers refuses bundle_emb keys): the
    conversion writes each as an embedding file beside the result and says so, instead of dropping it silently."""
    from sdtune.adapters.textual_inversion.files import read_embedding
    from sdtune.cli import main

    src = str(files["dir"] / "bundled" / "style.safetensors")
    out = tmp_path / "style_peft.safetensors"
    main(["convert", src, "--to", "diffusers", "--out", str(out)])
    beside = tmp_path / "style_peft.shiny.safetensors"
    assert "bundled embedding shiny" in capsys.readouterr().out and beside.is_file()
    emb = read_embedding(beside)
    assert emb.token == "shiny" and torch.equal(next(iter(emb.vectors.values())), files["vectors"])
    assert not any(k.startswith("bundle_emb") for k in load_file(out))
    (tmp_path / "b.shiny.safetensors").write_text("mine")  # in the way: refused before anything is written
    with pytest.raises(SystemExit) as refused:
        main(["convert", src, "--to", "diffusers", "--out", str(tmp_path / "b.safetensors")])
    assert refused.value.code == 2 and not (tmp_path / "b.safetensors").exists()
    assert (tmp_path / "b.shiny.safetensors").read_text() == "mine"
