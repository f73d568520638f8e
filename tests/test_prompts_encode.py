"""Prompt encoding: chunks, BOS/EOS/padding, emphasis modes, embeddings by name, SD1/SD2/SDXL conventions, and
bit-equality with diffusers' encode_prompt for plain prompts. Tiny random models (text width 64, 2 layers)."""

from __future__ import annotations

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.generate.conditioning import encode_with_pipeline
from sdtune.models.testing import tiny_pipeline
from sdtune.prompts import (
    EmbeddingRegistry,
    TextConditioner,
    WeightedPromptEncoder,
    attention_fragments,
    chunk_ids,
    chunk_tokens,
    parse_compel,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

WORDS = ("cat dog red blue green house tree car sun moon star fish bird king queen boat road hill lake sky "
         "rain snow fire wind rock").split()  # single CLIP tokens


@pytest.fixture(scope="module")
def pipes():
    return {family: tiny_pipeline(family) for family in ("sd1", "sd2", "sdxl")}


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def enc_text(pipe, text, emphasis="original", **kw):
    return TextConditioner(pipe, **kw).encode(attention_fragments(text), emphasis)


# -- plain prompts: bit-equal to diffusers --------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("negative", ["", "blurry, ugly"])
def test_plain_prompt_is_bit_equal_to_diffusers(pipes, family, negative):
    pipe = pipes[family]
    prompt = "a photo of a red cat, 4k, highly detailed"
    ref = encode_with_pipeline(pipe, prompt, negative, num_images=2, do_cfg=True, clip_skip=1)
    ours = WeightedPromptEncoder()(pipe, prompt, negative, num_images=2, do_cfg=True, clip_skip=1)
    assert ours.guidance is None
    for key in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
        a, b = getattr(ref, key), getattr(ours, key)
        assert (a is None) == (b is None), key
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b), key


def test_toy_tokenizer_model_is_bit_equal_to_diffusers(tiny_random_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_random_dir), safety_checker=None)
    ref = encode_with_pipeline(pipe, "a red circle on a white background", "blurry", num_images=1, do_cfg=True,
                               clip_skip=1)
    ours = WeightedPromptEncoder()(pipe, "a red circle on a white background", "blurry", num_images=1, do_cfg=True,
                                   clip_skip=1)
    assert torch.equal(ref.prompt_embeds, ours.prompt_embeds)
    assert torch.equal(ref.negative_prompt_embeds, ours.negative_prompt_embeds)


def test_clip_skip_sd1_uses_hidden_state_with_final_norm_for_both_prompts(pipes):
    pipe = pipes["sd1"]
    te, tok = pipe.text_encoder, pipe.tokenizer
    out = WeightedPromptEncoder()(pipe, "a red cat", "a dog", num_images=1, do_cfg=True, clip_skip=2)
    for text, got in (("a red cat", out.prompt_embeds), ("a dog", out.negative_prompt_embeds)):
        ids = tok(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            want = te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
        assert torch.equal(got, want)


def test_clip_skip_sdxl_matches_diffusers_for_the_prompt(pipes):
    pipe = pipes["sdxl"]
    ref = pipe.encode_prompt("a red cat", num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=1)
    ours = WeightedPromptEncoder()(pipe, "a red cat", "", num_images=1, do_cfg=False, clip_skip=2)
    assert torch.equal(ref[0], ours.prompt_embeds) and torch.equal(ref[2], ours.pooled_prompt_embeds)


# -- chunks ----------------------------------------------------------------------------------------------------------

def test_chunks_bos_eos_padding(pipes):
    tok = pipes["sd2"].tokenizer  # pads with "!" (id 0) after EOS
    chunks = chunk_tokens(attention_fragments(words(160)), tok)
    assert [len(c) for c in chunks] == [75, 75, 10]
    ids, weights = chunk_ids(chunks[2], tok)
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[11] == tok.eos_token_id
    assert set(ids[12:]) == {tok.pad_token_id} and weights == [1.0] * 77
    assert chunk_tokens(attention_fragments(""), tok) == [[]]


def test_long_prompt_chunks_are_encoded_independently(pipes):
    pipe = pipes["sd1"]
    text = words(300)
    enc = enc_text(pipe, text)
    assert enc.hidden.shape == (4, 77, 64)
    second = enc_text(pipe, words(75, 75))
    assert torch.allclose(enc.hidden[1], second.hidden[0], atol=1e-5)
    out = WeightedPromptEncoder()(pipe, text, "", num_images=1, do_cfg=True, clip_skip=1)
    assert out.prompt_embeds.shape == out.negative_prompt_embeds.shape == (1, 4 * 77, 64)
    empty = enc_text(pipe, "").hidden[0]
    assert torch.allclose(out.negative_prompt_embeds[0, 77:154], empty, atol=1e-6)  # padded with empty chunks


def test_break_and_comma_backtrack(pipes):
    tok = pipes["sd1"].tokenizer
    assert [len(c) for c in chunk_tokens(attention_fragments("a cat BREAK a dog"), tok)] == [2, 2]
    assert [len(c) for c in chunk_tokens(attention_fragments("BREAK"), tok)] == [0]  # as A1111: no empty tail
    assert [len(c) for c in chunk_tokens(attention_fragments("BREAK a"), tok)] == [0, 1]
    text = words(70) + ", " + words(10)
    assert [len(c) for c in chunk_tokens(attention_fragments(text), tok)] == [71, 10]  # cut after the comma
    assert [len(c) for c in chunk_tokens(attention_fragments(text), tok, comma_backtrack=0)] == [75, 6]
    far = words(40) + ", " + words(50)  # the comma is 35 tokens back: no cut
    assert [len(c) for c in chunk_tokens(attention_fragments(far), tok)] == [75, 16]


# -- emphasis -------------------------------------------------------------------------------------------------------

def test_emphasis_original_none_and_compel(pipes):
    w = torch.ones(77)
    w[2] = 1.5  # BOS, a, cat
    sdxl = pipes["sdxl"]  # penultimate layer: no final layer norm, so the mean is not ~0
    plain = enc_text(sdxl, "a cat on a hill").hidden[0]
    orig = enc_text(sdxl, "a (cat:1.5) on a hill", "original").hidden[0]
    for part in (slice(0, 64), slice(64, 128)):  # each encoder on its own, as A1111
        scaled = plain[:, part] * w[:, None]
        assert torch.allclose(orig[:, part], scaled * (plain[:, part].mean() / scaled.mean()), atol=1e-5)
        assert torch.allclose(orig[:, part].mean(), plain[:, part].mean(), atol=1e-6)
    pipe = pipes["sd1"]
    plain = enc_text(pipe, "a cat on a hill").hidden[0]
    none = enc_text(pipe, "a (cat:1.5) on a hill", "none").hidden[0]
    assert torch.allclose(none, plain * w[:, None])
    # final layer norm without bias: the mean is ~0 and 'original' falls back to multiplying
    assert torch.allclose(enc_text(pipe, "a (cat:1.5) on a hill", "original").hidden[0], none)
    empty = enc_text(pipe, "").hidden[0]
    up = TextConditioner(pipe).encode(parse_compel("a (cat)1.5 on a hill"), "compel").hidden[0]
    want = plain.clone()
    want[2] = empty[2] + (plain[2] - empty[2]) * 1.5
    assert torch.allclose(up, want, atol=1e-6)


def test_compel_down_weight_blends_with_masked_encoding(pipes):
    pipe = pipes["sd1"]
    cond = TextConditioner(pipe)
    full = cond.encode(parse_compel("a cat on a hill"), "compel").hidden[0]
    gone = cond.encode(parse_compel("a (cat)0 on a hill"), "compel").hidden[0]
    half = cond.encode(parse_compel("a (cat)0.5 on a hill"), "compel").hidden[0]
    empty = cond.encode(parse_compel(""), "compel").hidden[0]
    assert torch.allclose(gone[2], empty[2], atol=1e-6)  # the fragment's own position: the empty prompt's
    assert torch.equal(gone[:2], full[:2])  # tokens before it do not see it either way
    assert not torch.allclose(gone[3:], full[3:])  # tokens after it no longer attend to it
    assert torch.allclose(half, 0.5 * full + 0.5 * gone, atol=1e-5)


def test_sdxl_emphasis_per_encoder_and_pooled_from_clean_first_chunk(pipes):
    pipe = pipes["sdxl"]
    text = "(" + words(20) + ":1.4) " + words(100, 3)
    enc = enc_text(pipe, text)
    assert enc.hidden.shape == (2, 77, 128)
    first_chunk_plain = enc_text(pipe, words(20) + " " + words(55, 3))
    assert torch.allclose(enc.pooled, first_chunk_plain.pooled, atol=1e-6)


# -- embeddings by name ---------------------------------------------------------------------------------------------

def _rows(pipe, text, te="text_encoder", tok="tokenizer"):
    ids = getattr(pipe, tok)(text, add_special_tokens=False).input_ids
    return getattr(pipe, te).get_input_embeddings().weight[ids].detach().clone()


def test_embedding_vectors_replace_the_name(pipes):
    pipe = pipes["sd1"]
    reg = EmbeddingRegistry({"myword": _rows(pipe, "red cat"), "x1": _rows(pipe, "dog")})
    vocab = len(pipe.tokenizer)
    cond = TextConditioner(pipe, embeddings=reg)
    got = cond.encode(attention_fragments("a myword on a hill, (x1:1.2)"))
    want = enc_text(pipe, "a red cat on a hill, (dog:1.2)")
    assert torch.allclose(got.hidden, want.hidden, atol=1e-6)
    assert len(pipe.tokenizer) == vocab and not pipe.text_encoder.get_input_embeddings()._forward_hooks
    # whole words only, case-sensitive
    assert [len(c) for c in cond.tokens(attention_fragments("mywordy MyWord myword"))] == [
        len(pipe.tokenizer("mywordy MyWord", add_special_tokens=False).input_ids) + 2]


def test_multi_vector_embedding_never_splits_across_chunks(pipes):
    pipe = pipes["sd1"]
    reg = EmbeddingRegistry({"emb": torch.randn(4, 64)})
    chunks = TextConditioner(pipe, embeddings=reg).tokens(attention_fragments(words(73) + " emb " + words(3)))
    assert [len(c) for c in chunks] == [73, 7]
    assert [t.vector for t in chunks[1][:4]] == [0, 1, 2, 3] and chunks[1][0].embedding == "emb"


def test_sdxl_embeddings_per_encoder(pipes):
    pipe = pipes["sdxl"]
    reg = EmbeddingRegistry({"obj": {"clip_l": _rows(pipe, "cat"), "clip_g": _rows(pipe, "cat", "text_encoder_2",
                                                                                       "tokenizer_2")}})
    got = TextConditioner(pipe, embeddings=reg).encode(attention_fragments("a photo of obj"))
    want = enc_text(pipe, "a photo of cat")
    assert torch.allclose(got.hidden, want.hidden, atol=1e-6) and torch.allclose(got.pooled, want.pooled, atol=1e-6)
    bad = EmbeddingRegistry({"obj": {"clip_l": torch.zeros(1, 64), "clip_x": torch.zeros(1, 64)}})
    with pytest.raises(SdtuneError, match="clip_g"):
        TextConditioner(pipe, embeddings=bad).encode(attention_fragments("obj"))


def test_registry_rejects_bad_vectors():
    reg = EmbeddingRegistry()
    for name, vectors in [(" padded", torch.zeros(1, 4)), ("a:b", torch.zeros(1, 4)), ("x", torch.zeros(76, 4)), ("x", torch.full((1, 4), float("nan"))),
                          ("x", {"clip_l": torch.zeros(1, 4), "clip_g": torch.zeros(2, 8)}), ("x", "text")]:
        with pytest.raises(SdtuneError):
            reg.add(name, vectors)
    assert len(reg) == 0


# -- bad input never crashes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [
    "", "()[]((((", "(x:abc)", "(x:-1)", "(x:1e9)", "(x:99999999)", "a\\ b\\", "日本語の猫と🐱🎉 (かわいい:1.3)",
    "(" * 3000 + "x", '("a", "b").blend(1, -1)', '("a", "b").blend(0, 0)', "[a|b] AND c :0 AND d :-1",
    "BREAK BREAK", "<lora:x:1e999> <lora:>",
])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bad_input_gives_finite_embeddings(pipes, family, prompt):
    for emphasis in ("original", "none", "compel"):
        out = WeightedPromptEncoder()(pipes[family], prompt, prompt, num_images=1, do_cfg=True, clip_skip=1,
                                      steps=4, emphasis=emphasis)
        assert torch.isfinite(out.prompt_embeds).all() and torch.isfinite(out.negative_prompt_embeds).all()
        if out.guidance is not None:
            for part in out.guidance.parts:
                assert all(torch.isfinite(e).all() for e in part.embeds)


def test_ten_thousand_token_prompt_encodes(pipes):
    text = ", ".join(["a (red:1.2) cat on a blue hill"] * 1300)  # 8 tokens each with the comma: 10,400
    out = WeightedPromptEncoder()(pipes["sd1"], text, "", num_images=1, do_cfg=True, clip_skip=1)
    chunks = out.prompt_embeds.shape[1] // 77
    assert chunks >= 10400 // 75 and out.negative_prompt_embeds.shape == out.prompt_embeds.shape
    assert torch.isfinite(out.prompt_embeds).all()
