"""DreamBooth's --train-identifier (issue 21 part 4): the identifier's own row of each token table is learned and
saved in the checkpoint; every other row, and so every prompt without the identifier, is the base model's; the live
model is left without hooks; identifiers of several tokens are refused or skipped; bad rates are one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from sdtune.errors import SdtuneError
from sdtune.training import Trainer, train
from sdtune.training.methods.dreambooth import DreamBoothOptions
from sdtune.training.methods.identifier_rows import single_token_id
from sdtune.training.testing import quick_config, tiny_loaded

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


def options(**kw):
    return DreamBoothOptions(**{"prior_preservation": False, "diffusers_folder": False, "save_precision": "fp32",
                                **kw})


def tables(model):
    from sdtune.prompts.encoder import encoder_slots

    return {s.key: s.model.get_input_embeddings().weight.detach().clone() for s in encoder_slots(model.pipe)}


def encode(model, text):
    with torch.no_grad():
        return model.pipe.encode_prompt([text], device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)[0]


def test_dreambooth_learns_the_identifiers_row_alone_and_saves_it_in_the_checkpoint(tmp_path, sks_data, sd1):
    from sdtune.models import load_model

    model, said = copy.deepcopy(sd1), []
    result = train(quick_config(tmp_path, sks_data, "dreambooth", options(), steps=3), model=model,
                   echo=said.append)
    assert any(s.startswith("identifier 'sks': its embedding starts from") for s in said)
    back = load_model(str(result.final))
    sks = single_token_id(sd1.pipe.tokenizer, "sks")
    before, after = tables(sd1)["clip_l"], tables(back)["clip_l"]
    changed = (before != after).any(dim=1).nonzero().flatten().tolist()
    assert changed == [sks]  # that row learned, every other row is the base model's exactly
    assert torch.equal(encode(back, "a red shape on a blue background"), encode(sd1, "a red shape on a blue background"))
    assert not torch.equal(encode(back, "a red sks shape"), encode(sd1, "a red sks shape"))
    # the live model: no hook left, its table carries the trained row as the file does
    embedding = model.pipe.text_encoder.get_input_embeddings()
    assert not embedding._forward_hooks
    assert torch.equal(embedding.weight[sks], after[sks])
    with safe_open(str(result.final), "pt") as f:
        assert f.metadata()["sdtune_identifier_trained"] == "sks"


@pytest.mark.parametrize("family, encoders", [("sdxl", 2), ("sd2", 1)])
def test_every_family_learns_the_row_in_each_text_encoder(tmp_path, sks_data, family, encoders):
    """SDXL: both encoders' tables (clip_l, clip_g); SD2: its one encoder, with v-prediction."""
    from sdtune.prompts.encoder import encoder_slots

    base = tiny_loaded(family)
    before = tables(base)
    model = copy.deepcopy(base)
    t = Trainer(quick_config(tmp_path, sks_data, "dreambooth", options(), steps=2), model=model, echo=lambda s: None)
    t.run()
    after = tables(model)
    assert len(after) == encoders
    for slot in encoder_slots(model.pipe):
        sks = single_token_id(slot.tokenizer, "sks")
        assert (before[slot.key] != after[slot.key]).any(dim=1).nonzero().flatten().tolist() == [sks]
    assert {f"identifier.{k}" for k in after} <= set(t.method.state_dict())
    # only captions that read the trained row are encoded every step; the rest come from the cache, the same values
    method = t.method
    assert method.encodes_live("a red sks shape") and not method.encodes_live("a red shape")
    both = ["a red sks shape", "a red shape"]
    mixed, pooled = method.encode_text(both)
    assert "a red shape" in method._text_cache and "a red sks shape" not in method._text_cache
    method.trains_text_encoder = True  # every caption encoded live
    live, live_pooled = method.encode_text(both)
    # (encoded in other batches: equal up to float rounding)
    assert torch.allclose(mixed, live, atol=1e-6) and (pooled is None or torch.allclose(pooled, live_pooled, atol=1e-6))


def test_the_identifiers_vector_starts_from_the_class_noun_after_it(tmp_path, sks_data, sd1):
    """"a red sks shape": the vector starts as "shape"'s row (a tiny rate keeps it there for one step), so sks begins
    as a word of the right class instead of a rare token; the file says which word it started from."""
    said: list[str] = []
    model = copy.deepcopy(sd1)
    result = train(quick_config(tmp_path, sks_data, "dreambooth", options(identifier_lr=1e-12), steps=1),
                   model=model, echo=said.append)
    assert any(s.startswith("identifier 'sks': its embedding starts from 'shape' (the word after it") for s in said)
    tok = sd1.pipe.tokenizer
    sks, shape = single_token_id(tok, "sks"), single_token_id(tok, "shape")
    before, after = tables(sd1)["clip_l"], tables(model)["clip_l"]
    assert torch.allclose(after[sks], before[shape], atol=1e-6) and not torch.allclose(after[sks], before[sks])
    with safe_open(str(result.final), "pt") as f:
        assert f.metadata()["sdtune_identifier_init"] == "shape"


def test_identifier_init_names_the_start_or_keeps_the_identifiers_own_row(tmp_path, sks_data, sd1):
    said: list[str] = []
    model = copy.deepcopy(sd1)
    train(quick_config(tmp_path / "a", sks_data, "dreambooth", options(identifier_lr=1e-12, identifier_init="sks"),
                       steps=1), model=model, echo=said.append)
    assert any(s.startswith("identifier 'sks': its embedding trains") for s in said)
    sks = single_token_id(sd1.pipe.tokenizer, "sks")
    assert torch.allclose(tables(model)["clip_l"][sks], tables(sd1)["clip_l"][sks], atol=1e-6)
    model, said = copy.deepcopy(sd1), []
    train(quick_config(tmp_path / "b", sks_data, "dreambooth", options(identifier_lr=1e-12, identifier_init="red"),
                       steps=1), model=model, echo=said.append)
    assert any("starts from 'red' (--identifier-init)" in s for s in said)
    red = single_token_id(sd1.pipe.tokenizer, "red")
    assert torch.allclose(tables(model)["clip_l"][sks], tables(sd1)["clip_l"][red], atol=1e-6)
    model, said = copy.deepcopy(sd1), []  # the identifier itself, in any case: its own row
    train(quick_config(tmp_path / "d", sks_data, "dreambooth", options(identifier_lr=1e-12, identifier_init=" SKS"),
                       steps=1), model=model, echo=said.append)
    assert any(s.startswith("identifier 'sks': its embedding trains") for s in said)
    assert single_token_id(sd1.pipe.tokenizer, "qzxvw") is None
    said = []  # refused before the class images are made
    with pytest.raises(SdtuneError, match="--identifier-init 'qzxvw' is several tokens"):
        train(quick_config(tmp_path / "c", sks_data, "dreambooth",
                           options(identifier_init="qzxvw", prior_preservation=True), steps=1),
              model=copy.deepcopy(sd1), echo=said.append)
    assert not any("class image" in s for s in said)


def test_a_class_noun_of_several_tokens_leaves_the_identifiers_own_row_with_a_note(tmp_path, sd1):
    from sdtune.toy.testing import write_toy_dataset

    data = write_toy_dataset(tmp_path / "qz", 2, size=32, shapes=("heart",), caption="a {colour} sks qzxvw")
    said: list[str] = []
    model = copy.deepcopy(sd1)
    train(quick_config(tmp_path / "a", data, "dreambooth", options(identifier_lr=1e-12), steps=1), model=model,
          echo=said.append)
    assert any("starts from its own row (the word after it, 'qzxvw', is several tokens)" in s for s in said)
    sks = single_token_id(sd1.pipe.tokenizer, "sks")
    assert torch.allclose(tables(model)["clip_l"][sks], tables(sd1)["clip_l"][sks], atol=1e-6)


def test_the_class_noun_is_the_plain_word_after_the_identifier_in_most_captions():
    from sdtune.training.identifier import class_noun

    assert class_noun(["a red sks shape on a blue background", "a sks shape"], "sks") == "shape"
    assert class_noun(["a photo of sks dog", "sks dog running", "a sks"], "sks") == "dog"  # 2 of 3
    assert class_noun(["a photo of sks dog", "a sks", "sks"], "sks") is None  # 1 of 3: no class to start from
    assert class_noun(["sks, 1girl, smile", "sks, 1girl"], "sks") is None  # tags: a comma, not a noun, follows
    assert class_noun(["a photo of <sks> cat"], "<sks>") == "cat"
    assert class_noun(["a red shape"], "sks") is None
    assert class_noun(["a photo of sks in a garden", "sks in the snow"], "sks") is None  # not a class: "in"
    assert class_noun(["sks wearing a hat", "sks is smiling"], "sks") is None
    assert class_noun(["a x-sks cat, sks dog", "sks dog"], "sks") == "dog"  # x-sks is another word


def test_an_identifier_of_several_tokens_is_skipped_or_refused(tmp_path, sd1):
    from sdtune.toy.testing import write_toy_dataset

    data = write_toy_dataset(tmp_path / "qz", 2, size=32, shapes=("heart",), caption="a {colour} qzxvw shape")
    assert single_token_id(sd1.pipe.tokenizer, "qzxvw") is None
    said: list[str] = []
    model = copy.deepcopy(sd1)
    train(quick_config(tmp_path / "a", data, "dreambooth", options(identifier="qzxvw"), steps=1), model=model,
          echo=said.append)
    assert any("not trained: the identifier 'qzxvw' is several tokens" in s for s in said)
    assert torch.equal(tables(model)["clip_l"], tables(sd1)["clip_l"])
    with pytest.raises(SdtuneError, match="--train-identifier cannot train: the identifier 'qzxvw' is several"):
        train(quick_config(tmp_path / "b", data, "dreambooth", options(identifier="qzxvw", train_identifier=True),
                           steps=1), model=copy.deepcopy(sd1))


def test_off_leaves_the_text_encoder_alone(tmp_path, sks_data, sd1):
    model = copy.deepcopy(sd1)
    train(quick_config(tmp_path, sks_data, "dreambooth", options(train_identifier=False), steps=2), model=model,
          echo=lambda s: None)
    assert torch.equal(tables(model)["clip_l"], tables(sd1)["clip_l"])


def test_bad_identifier_rates_are_one_line_errors(tmp_path, sks_data):
    for bad, match in ((options(identifier_lr=0.0), "identifier_lr 0.0 must be > 0"),
                       (options(identifier_lr=1e-3, train_identifier=False), "identifier_lr is set but"),
                       (options(identifier_init="dog", train_identifier=False), "identifier_init is set but"),
                       (options(identifier_init=" "), "identifier_init ' ' must be one word"),
                       (options(identifier_init="a dog"), "identifier_init 'a dog' must be one word")):
        with pytest.raises(SdtuneError, match=match):
            quick_config(tmp_path, sks_data, "dreambooth", bad).check_values()


def test_resume_repeats_the_uninterrupted_run_and_an_older_state_says_how_to_resume(tmp_path, sks_data, sd1):
    """The vectors are part of the resumable state: stopped after step 1 and resumed, the losses and the saved
    row are the uninterrupted run's exactly."""
    def cfg(name, **kw):
        return quick_config(tmp_path / name, sks_data, "dreambooth", options(**kw), steps=3)

    def stop_after_1(trainer, step, loss):
        if step == 1:
            trainer.request_stop()

    quiet = dict(echo=lambda s: None)
    full_model = copy.deepcopy(sd1)
    full = train(cfg("full"), model=full_model, **quiet)
    first = train(cfg("part"), model=copy.deepcopy(sd1), on_step=stop_after_1, **quiet)
    assert len(first.losses) == 1
    part_model = copy.deepcopy(sd1)
    said: list[str] = []  # resumed with another --identifier-init: the saved vectors (from shape) go on
    rest = train(cfg("part", identifier_init="red").replace(resume="auto"), model=part_model, echo=said.append)
    assert rest.losses == full.losses[1:]
    assert torch.equal(tables(part_model)["clip_l"], tables(full_model)["clip_l"])
    assert not any("changed settings" in s for s in said)
    with safe_open(str(rest.final), "pt") as f:
        assert f.metadata()["sdtune_identifier_init"] == "shape"  # what the vectors started from
    # the same state resumed with another identifier ("shape" is in every caption too): its vectors are sks's
    with pytest.raises(SdtuneError, match="belong to another word than 'shape'"):
        train(cfg("part", identifier="shape").replace(resume="auto", steps=4), model=copy.deepcopy(sd1), **quiet)
    # a state saved without the vectors (--no-train-identifier, or before the option existed)
    train(cfg("old", train_identifier=False), model=copy.deepcopy(sd1), on_step=stop_after_1, **quiet)
    refused = copy.deepcopy(sd1)
    with pytest.raises(SdtuneError, match="resumes with --no-train-identifier"):
        train(cfg("old").replace(resume="auto"), model=refused, **quiet)
    assert not refused.pipe.text_encoder.get_input_embeddings()._forward_hooks  # given back without the hook
