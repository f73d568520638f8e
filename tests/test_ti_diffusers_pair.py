"""diffusers' SDXL textual inversion output as one embedding.

Facts (diffusers examples/textual_inversion/textual_inversion_sdxl.py, `save_progress` and the end of `main`): the
script writes `learned_embeds.safetensors` = {placeholder_token: text_encoder_1 rows [n, 768]} and
`learned_embeds_2.safetensors` = {placeholder_token: text_encoder_2 rows [n, 1280]}, safetensors metadata
{"format": "pt"} (a torch .bin without safe serialization), and intermediate saves
`learned_embeds-steps-N.safetensors` / `learned_embeds_2-steps-N.safetensors`. The one-file SDXL layout A1111 and
ComfyUI read is `clip_l` [n, 768] + `clip_g` [n, 1280]."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune.adapters.textual_inversion import EmbeddingLibrary, read_embedding
from sdtune.errors import SdtuneError

TOKEN = "<cat-toy>"


def diffusers_pair(folder, n=2, widths=(768, 1280), steps="", seed=0, ext="safetensors"):
    """The two files as the diffusers script writes them; returns (clip_l rows, clip_g rows)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    l, big = torch.randn(n, widths[0], generator=g), torch.randn(n, widths[1], generator=g)
    if ext == "safetensors":
        save_file({TOKEN: l}, str(folder / f"learned_embeds{steps}.safetensors"), metadata={"format": "pt"})
        save_file({TOKEN: big}, str(folder / f"learned_embeds_2{steps}.safetensors"), metadata={"format": "pt"})
    else:
        torch.save({TOKEN: l}, folder / f"learned_embeds{steps}.bin")
        torch.save({TOKEN: big}, folder / f"learned_embeds_2{steps}.bin")
    return l, big


@pytest.mark.parametrize("ext", ["safetensors", "bin"])
@pytest.mark.parametrize("which", ["learned_embeds", "learned_embeds_2"])
def test_either_file_reads_as_one_sdxl_embedding(tmp_path, which, ext):
    l, big = diffusers_pair(tmp_path, ext=ext)
    emb = read_embedding(tmp_path / f"{which}.{ext}")
    assert emb.is_sdxl() and emb.name == "cat-toy" and emb.token == TOKEN
    assert torch.equal(emb.vectors["clip_l"], l) and torch.equal(emb.vectors["clip_g"], big)


def test_a_lone_file_is_still_a_one_encoder_embedding_and_mismatched_pairs_are_refused(tmp_path):
    diffusers_pair(tmp_path / "a")
    (tmp_path / "a" / "learned_embeds_2.safetensors").unlink()
    emb = read_embedding(tmp_path / "a" / "learned_embeds.safetensors")
    assert set(emb.vectors) == {"clip_l"}
    diffusers_pair(tmp_path / "b")
    save_file({TOKEN: torch.ones(3, 1280)}, str(tmp_path / "b" / "learned_embeds_2.safetensors"))
    with pytest.raises(SdtuneError, match="2 vectors for CLIP-L but 3 for OpenCLIP-G"):
        read_embedding(tmp_path / "b" / "learned_embeds.safetensors")


def test_convert_makes_the_one_file_sdxl_layout(tmp_path, capsys):
    from sdtune.cli import main
    from sdtune.formats.identify import identify

    l, big = diffusers_pair(tmp_path / "run")
    info = identify(tmp_path / "run" / "learned_embeds.safetensors")
    assert info.family == "sdxl" and any("diffusers SDXL pair" in s for s in info.summary)
    out = tmp_path / "cat-toy.safetensors"
    try:
        main(["convert", str(tmp_path / "run" / "learned_embeds_2.safetensors"), "--to", "sdxl", "--out", str(out)])
    except SystemExit as exc:
        assert not exc.code
    assert "use it in prompts as 'cat-toy'" in capsys.readouterr().out
    sd = load_file(str(out))
    assert set(sd) == {"clip_l", "clip_g"} and sd["clip_l"].shape == (2, 768) and sd["clip_g"].shape == (2, 1280)
    assert torch.equal(sd["clip_l"], l) and torch.equal(sd["clip_g"], big)


def test_library_and_generator_use_the_pair_once_by_its_token(tmp_path):
    from sdtune.adapters.textual_inversion.library import _slots_of
    from sdtune.generate import Generator
    from sdtune.prompts import EmbeddingRegistry, WeightedPromptEncoder
    from sdtune.training.testing import tiny_loaded

    model = tiny_loaded("sdxl")
    widths = dict(_slots_of(model.pipe))
    folder = tmp_path / "out"
    diffusers_pair(folder, widths=(widths["clip_l"], widths["clip_g"]), steps="-steps-500", seed=1)
    l, big = diffusers_pair(folder, widths=(widths["clip_l"], widths["clip_g"]))
    msgs: list[str] = []
    lib = EmbeddingLibrary([folder], pipe=model.pipe, echo=msgs.append)
    lib.refresh()
    assert msgs == [] and lib.names == [TOKEN, "cat-toy", "cat-toy-steps-500"]
    assert torch.equal(lib.registry.vectors(TOKEN, "clip_g", widths["clip_g"]), big)

    gen = Generator(model, embeddings=[folder / "learned_embeds.safetensors"])  # one file named: the pair is used
    gen.embeddings.refresh()
    kw = dict(num_images=1, do_cfg=True, clip_skip=1)
    ref = WeightedPromptEncoder(EmbeddingRegistry({"cat-toy": {"clip_l": l, "clip_g": big}}))
    got = gen.encode_prompt(gen.model.pipe, "a photo of cat-toy", "", **kw)
    want = ref(gen.model.pipe, "a photo of cat-toy", "", **kw)
    assert torch.equal(got.prompt_embeds, want.prompt_embeds)
    assert not torch.equal(got.prompt_embeds, WeightedPromptEncoder()(gen.model.pipe, "a photo of cat-toy", "",
                                                                         **kw).prompt_embeds)
