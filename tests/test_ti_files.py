"""Textual Inversion files: every layout written and read back, A1111's PNG chunk, width routing, conversion,
diffusers' own loader, and the embedding library's hot loading."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from sdtune.adapters.textual_inversion import EmbeddingLibrary, Embedding, read_embedding, write_embedding
from sdtune.adapters.textual_inversion.files import PNG_CHUNK, FORMATS
from sdtune.errors import SdtuneError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


def sd1(n=2, width=768, token="<star>"):
    g = torch.Generator().manual_seed(n * width)
    return Embedding("star", {"clip_l" if width == 768 else "*": torch.randn(n, width, generator=g)}, token=token,
                     step=7)


def sdxl(n=3):
    g = torch.Generator().manual_seed(n)
    return Embedding("star", {"clip_l": torch.randn(n, 768, generator=g), "clip_g": torch.randn(n, 1280, generator=g)},
                     token="<star>", step=9)


EXT = {"safetensors": ".safetensors", "diffusers": ".safetensors", "a1111": ".pt", "kohya": ".safetensors",
       "sdxl": ".safetensors", "png": ".png"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("make", [sd1, sdxl], ids=["sd1", "sdxl"])
def test_every_format_round_trips(tmp_path, fmt, make):
    emb = make()
    if fmt == "sdxl" and not emb.is_sdxl():
        with pytest.raises(SdtuneError, match="not an SDXL embedding"):
            write_embedding(emb, tmp_path / "x.safetensors", fmt)
        return
    if emb.is_sdxl() and fmt in ("a1111", "png"):  # A1111 crashes on these; the error names what loads
        with pytest.raises(SdtuneError, match="does not load in A1111"):
            write_embedding(emb, tmp_path / f"x{EXT[fmt]}", fmt)
        return
    path = write_embedding(emb, tmp_path / f"mystar{EXT[fmt]}", fmt, metadata={"sdtune_family": "sd1"})
    back = read_embedding(path)
    assert back.name == "mystar" and back.token == "<star>"
    assert set(back.vectors) == set(emb.vectors)
    for k in emb.vectors:
        assert torch.equal(back.vectors[k], emb.vectors[k])


def test_diffusers_bin_and_1d_tensor(tmp_path):
    emb = sd1(1)
    path = write_embedding(emb, tmp_path / "learned_embeds.bin", "diffusers")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["<star>"] and raw["<star>"].shape == (1, 768)
    torch.save({"<cat>": torch.ones(768)}, tmp_path / "cat.bin")
    back = read_embedding(tmp_path / "cat.bin")
    assert back.token == "<cat>" and back.vectors["clip_l"].shape == (1, 768)


def test_a1111_pt_layout_loads_weights_only(tmp_path):
    path = write_embedding(sd1(2), tmp_path / "star.pt", "a1111", checkpoint_hash="abcdef1234", checkpoint_name="m")
    raw = torch.load(path, weights_only=True)  # plain dicts, strings, ints and tensors only
    assert raw["string_to_token"] == {"*": 265} and raw["string_to_param"]["*"].shape == (2, 768)
    assert raw["name"] == "<star>" and raw["step"] == 7
    assert raw["sd_checkpoint"] == "abcdef1234" and raw["sd_checkpoint_name"] == "m"


def test_png_chunk_is_a1111s_base64_json(tmp_path):
    from PIL import Image

    emb = sd1(2)
    path = write_embedding(emb, tmp_path / "pngstar.png", "png")
    with Image.open(path) as im:
        payload = im.text[PNG_CHUNK]
    data = json.loads(base64.b64decode(payload))
    assert data["name"] == "pngstar" and data["step"] == 7
    t = torch.tensor(data["string_to_param"]["*"]["TORCHTENSOR"])
    assert torch.equal(t, emb.vectors["clip_l"])
    assert read_embedding(path).name == "pngstar"  # A1111: a PNG's name is the one stored in it


def test_width_routing():
    from sdtune.adapters.textual_inversion.files import from_dict

    for width, key in ((768, "clip_l"), (1024, "clip_h"), (1280, "clip_g"), (64, "*")):
        emb = from_dict({"emb_params": torch.zeros(2, width)}, "x")
        assert list(emb.vectors) == [key]


def test_bad_files_are_one_line_errors(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all" * 10)
    torch.save({"emb_params": torch.full((1, 8), float("nan"))}, tmp_path / "nan.pt")
    for name, msg in (("x.safetensors", "not a textual-inversion"), ("plain.png", "without an embedding"),
                      ("junk.pt", "text file|corrupt"), ("nan.pt", "NaN"), ("missing.pt", "no such")):
        with pytest.raises(SdtuneError, match=msg):
            read_embedding(tmp_path / name)


def test_identify_and_convert_cli(tmp_path, capsys):
    from sdtune.cli import main
    from sdtune.formats.identify import identify

    src = write_embedding(sd1(2), tmp_path / "star.safetensors", "safetensors")
    outs = {}
    for fmt in ("diffusers", "a1111", "kohya", "png", "safetensors"):
        out = tmp_path / f"c_{fmt}{EXT[fmt]}"
        main(["convert", str(src), "--to", fmt, "--out", str(out)])
        outs[fmt] = out
        assert torch.equal(read_embedding(out).vectors["clip_l"], read_embedding(src).vectors["clip_l"])
        if fmt != "png":
            assert identify(out).kind == "embedding"
    main(["convert", str(outs["png"]), "--to", "a1111", "--out", str(tmp_path / "from_png.pt")])
    assert "read back identical" in capsys.readouterr().out
    xl = write_embedding(sdxl(), tmp_path / "xl.safetensors", "sdxl")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # an SDXL PNG embedding crashes A1111: refused, one line
        main(["convert", str(xl), "--to", "png", "--out", str(tmp_path / "xl.png")])
    assert exit_info.value.code == 2 and not (tmp_path / "xl.png").exists()
    assert "clip_l + clip_g" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers", "a1111"])
def test_diffusers_load_textual_inversion_reads_our_files(tmp_path, fmt):
    from sdtune.models.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    emb = sd1(2, width=64)
    path = write_embedding(emb, tmp_path / f"star{EXT[fmt]}", fmt)
    pipe.load_textual_inversion(str(path), token="<star>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<star>", "<star>_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows.detach(), emb.vectors["*"])


# ------------------------------------------------------------------------------------------------ the library

@pytest.fixture(scope="module")
def pipe():
    from sdtune.models.testing import tiny_pipeline

    return tiny_pipeline("sd1")


def test_library_hot_loads_adds_changes_removes(tmp_path, pipe):
    folder = tmp_path / "embs"
    (folder / "sub").mkdir(parents=True)
    msgs = []
    lib = EmbeddingLibrary([folder], pipe=pipe, echo=msgs.append)
    assert lib.names == []
    write_embedding(sd1(1, 64), folder / "sub" / "one.safetensors", "safetensors")
    ch = lib.refresh()
    assert ch.added == ["one", "<star>"] and "one" in lib.registry and "<star>" in lib.registry
    v1 = lib.registry.vectors("one", "clip_l", 64).clone()
    # overwritten in place (same size), then replaced through a rename
    e2 = Embedding("one", {"*": torch.ones(1, 64)}, token="<star>", step=7)
    path = folder / "sub" / "one.safetensors"
    write_embedding(e2, tmp_path / "tmp.safetensors", "safetensors")
    data = (tmp_path / "tmp.safetensors").read_bytes()
    assert len(data) == path.stat().st_size
    with open(path, "r+b") as f:
        f.write(data)
    ch = lib.refresh()
    assert "one" in ch.changed and torch.equal(lib.registry.vectors("one", "clip_l", 64), torch.ones(1, 64))
    assert not torch.equal(v1, torch.ones(1, 64))
    assert not lib.refresh()  # nothing changed: nothing re-read
    (folder / "sub" / "one.safetensors").unlink()
    ch = lib.refresh()
    assert set(ch.removed) == {"one", "<star>"} and len(lib.registry) == 0


def test_library_skips_wrong_width_and_family_with_shapes(tmp_path, pipe):
    write_embedding(sd1(2, 768), tmp_path / "wide.safetensors", "safetensors")
    write_embedding(sdxl(), tmp_path / "xl.safetensors", "sdxl")
    write_embedding(sd1(1, 64, token="<a>"), tmp_path / "a" / "dup.pt", "a1111")
    write_embedding(sd1(1, 64, token="<b>"), tmp_path / "b" / "dup.pt", "a1111")
    msgs = []
    lib = EmbeddingLibrary([tmp_path], pipe=pipe, echo=msgs.append)
    assert lib.names == ["<a>", "<b>", "dup"]
    text = "\n".join(msgs)
    assert "expected clip_l [n, 64], found clip_l: [2, 768]" in text
    assert "expected clip_l [n, 64], found clip_l: [3, 768], clip_g: [3, 1280]" in text
    assert "already used by" in text and str(tmp_path / "a" / "dup.pt") in text
    (tmp_path / "a" / "dup.pt").unlink()  # the name is free again: the other file takes it
    lib.refresh()
    assert lib.names == ["<b>", "dup"] and lib.path_of("dup") == tmp_path / "b" / "dup.pt"


def test_generator_uses_embeddings_by_name_weighted_and_negative(tmp_path, pipe):
    from sdtune.generate import GenerationParams, Generator
    from sdtune.prompts import EmbeddingRegistry, WeightedPromptEncoder
    from sdtune.training.testing import tiny_loaded

    model = tiny_loaded("sd1")
    a, b = torch.randn(2, 64), torch.randn(1, 64)
    write_embedding(Embedding("ea", {"*": a}), tmp_path / "ea.safetensors", "safetensors")
    gen = Generator(model, embeddings=[tmp_path])
    assert gen.embeddings.names == ["ea"]
    ref = WeightedPromptEncoder(EmbeddingRegistry({"ea": a, "eb": b}))
    kw = dict(num_images=1, do_cfg=True, clip_skip=1)
    prompt, neg = "a photo of (ea:1.2) with eb", "eb, blurry"
    pipe_id = id(gen.model.pipe)
    write_embedding(Embedding("eb", {"*": b}), tmp_path / "deeper" / "eb.pt", "a1111")
    params = GenerationParams(prompt=prompt, negative_prompt=neg, steps=2, seed=3)
    images = gen.generate(params)
    assert gen.embeddings.names == ["ea", "eb"] and id(gen.model.pipe) == pipe_id
    got = gen.encode_prompt(gen.model.pipe, prompt, neg, **kw)
    want = ref(gen.model.pipe, prompt, neg, **kw)
    assert torch.equal(got.prompt_embeds, want.prompt_embeds)
    assert torch.equal(got.negative_prompt_embeds, want.negative_prompt_embeds)
    plain = gen.encode_prompt(gen.model.pipe, "a photo of ea with eb", "", **kw)
    assert not torch.equal(plain.prompt_embeds, WeightedPromptEncoder()(gen.model.pipe, "a photo of ea with eb", "",
                                                                           **kw).prompt_embeds)
    assert images[0].image.size == (16, 16)


def test_generate_cli_embeddings(tmp_path, capsys, tiny_random_dir):
    from sdtune.cli import main

    write_embedding(Embedding("mything", {"*": torch.randn(2, 64)}), tmp_path / "e" / "mything.pt", "a1111")
    try:
        main(["generate", "a (mything:1.1) on a white background", "--negative", "mything", "--model",
              str(tiny_random_dir), "--embeddings", str(tmp_path / "e"), "--steps", "2", "--seed", "1", "--out",
              str(tmp_path / "o")])
    except SystemExit as exc:
        assert not exc.code
    err = capsys.readouterr().err
    assert "embeddings: mything" in err
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_an_embedding_whose_file_name_has_spaces_is_used_by_that_name(tmp_path):
    """A1111 names an embedding by its file stem, spaces included ("my style.pt" -> "my style"); before, sdtune
    skipped such a file."""
    from sdtune.generate import GenerationParams, Generator

    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)) * 0.5
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_embedding(Embedding(name="my style", vectors={"*": vectors}), tmp_path / "a" / "my style.safetensors")
    write_embedding(Embedding(name="mystyle", vectors={"*": vectors}), tmp_path / "b" / "mystyle.safetensors")
    spaced = Generator("tiny", embeddings=[tmp_path / "a"])
    assert "my style" in spaced.embeddings.names
    one_word = Generator("tiny", embeddings=[tmp_path / "b"])
    image = spaced.generate(GenerationParams(prompt="a red circle, my style", steps=3, seed=2))[0].image
    same = one_word.generate(GenerationParams(prompt="a red circle, mystyle", steps=3, seed=2))[0].image
    plain = spaced.generate(GenerationParams(prompt="a red circle, my", steps=3, seed=2))[0].image
    assert image.tobytes() == same.tobytes() and image.tobytes() != plain.tobytes()
