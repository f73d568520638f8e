"""Pivotal tuning (`train lora --pivotal`): the new word's vectors train with the LoRA for the first --pivotal-frac
of the steps, are bundled in the kohya file as A1111 reads them (string_to_param.* for SD1/SD2, clip_l/clip_g for
SDXL) and written as a separate embedding (sdtune's reader, diffusers' load_textual_inversion); generate with the
LoRA (--lora or a prompt tag) makes the word usable with no other flag; resume is exact; bad options are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli.testing import run_cli
from sdtune.errors import SdtuneError
from sdtune.toy.testing import write_toy_dataset
from sdtune.training import TrainConfig, Trainer, train
from sdtune.training.methods.lora import LoraOptions
from sdtune.training.testing import tiny_loaded

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)
WORD = "<s0><s1>"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("data"), 2, size=32, caption="a {colour} TOK shape")


def config(tmp_path, data, name="out", steps=2, **opts):
    options = LoraOptions(pivotal=True, **opts)
    return TrainConfig(method="lora", data=str(data), out=str(tmp_path / name), steps=steps, lr=1e-3,
                       resolution=32, save_every=0, progress=False, tensorboard=False, options=options)


def quiet():
    return {"echo": lambda s: None}


def bundled(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("bundle_emb.")}


@pytest.mark.parametrize("family,slots", [("sd1", ["string_to_param.*"]), ("sd2", ["string_to_param.*"]),
                                          ("sdxl", ["clip_g", "clip_l"])])
def test_the_lora_file_bundles_the_word_and_the_embedding_file_holds_the_same_vectors(tmp_path, data, family,
                                                                                      slots):
    from sdtune.adapters.textual_inversion.files import read_embedding
    from sdtune.prompts.encoder import encoder_slots

    model = tiny_loaded(family)
    widths = {s.key: s.width for s in encoder_slots(model.pipe)}
    r = train(config(tmp_path, data, pivotal_tokens=3), model=model, **quiet())
    b = bundled(r.final)
    assert sorted(b) == [f"bundle_emb.<s0><s1><s2>.{s}" for s in slots]
    for key, t in b.items():  # [vectors, width of the encoder]
        slot = key.rsplit(".", 1)[1]
        assert t.shape == (3, widths.get(slot, next(iter(widths.values()))))
    emb = read_embedding(tmp_path / "out" / "embeddings" / "s0s1s2.safetensors")
    assert emb.token == "<s0><s1><s2>" and emb.num_vectors == 3
    if family == "sdxl":
        assert torch.equal(emb.vectors["clip_l"], b["bundle_emb.<s0><s1><s2>.clip_l"])
        assert torch.equal(emb.vectors["clip_g"], b["bundle_emb.<s0><s1><s2>.clip_g"])
    else:
        assert torch.equal(emb.single(), b["bundle_emb.<s0><s1><s2>.string_to_param.*"])
        assert list(load_file(str(emb.path))) == ["emb_params"]  # A1111's and ComfyUI's safetensors layout


def test_diffusers_load_textual_inversion_reads_the_embedding_file(tmp_path, data, sd1):
    r = train(config(tmp_path, data), model=copy.deepcopy(sd1), **quiet())
    vectors = bundled(r.final)[f"bundle_emb.{WORD}.string_to_param.*"]
    pipe = tiny_loaded("sd1").pipe
    pipe.load_textual_inversion(str(tmp_path / "out" / "embeddings" / "s0s1.safetensors"), token=WORD)
    ids = pipe.tokenizer.convert_tokens_to_ids([WORD, WORD + "_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.allclose(rows, vectors)


def test_the_word_trains_until_frac_then_stays_while_the_lora_goes_on(tmp_path, data, sd1):
    r = train(config(tmp_path, data, steps=4, pivotal_frac=0.5).replace(save_every=1, keep_checkpoints="all"),
              model=copy.deepcopy(sd1), **quiet())
    files = [tmp_path / "out" / "checkpoints" / f"lora-{s:06d}.safetensors" for s in range(1, 5)]
    words = [bundled(f)[f"bundle_emb.{WORD}.string_to_param.*"] for f in files]
    lora = [load_file(str(f)) for f in files]
    key = next(k for k in lora[0] if k.endswith("lora_up.weight"))
    assert not torch.equal(words[0], words[1])           # steps 1-2: the word trains
    assert torch.equal(words[1], words[2]) and torch.equal(words[2], words[3])  # after frac: exactly unchanged
    assert not torch.equal(lora[2][key], lora[3][key])   # the LoRA still trains
    assert load_file(str(r.final)).keys() == lora[3].keys()


def test_captions_get_the_word_in_place_of_the_abstraction(tmp_path, data, sd1):
    t = Trainer(config(tmp_path, data), model=copy.deepcopy(sd1), **quiet())
    t.run()
    assert all(WORD in it.caption and "TOK" not in it.caption for it in t.dataset.items)


def test_a_caption_without_the_abstraction_or_the_word_stops_the_run(tmp_path, sd1):
    plain = write_toy_dataset(tmp_path / "plain", 2, size=32)
    with pytest.raises(SdtuneError, match="contain neither 'TOK'"):
        train(config(tmp_path, plain), model=copy.deepcopy(sd1), **quiet())
    r = train(config(tmp_path, plain, "p", prompt="a photo of TOK shape").replace(
        data=str(write_toy_dataset(tmp_path / "nocap", 2, size=32, caption=""))), model=copy.deepcopy(sd1), **quiet())
    assert r.final.exists()


def test_resume_across_the_frac_boundary_repeats_the_uninterrupted_run(tmp_path, data, sd1):
    full = train(config(tmp_path, data, "full", steps=4, pivotal_frac=0.5), model=copy.deepcopy(sd1), **quiet())

    def stop_after_1(trainer, step, loss):
        if step == 1:
            trainer.request_stop()

    part = config(tmp_path, data, "part", steps=4, pivotal_frac=0.5)
    first = train(part, model=copy.deepcopy(sd1), on_step=stop_after_1, **quiet())
    assert len(first.losses) == 1
    rest = train(part.replace(resume="auto"), model=copy.deepcopy(sd1), **quiet())
    assert rest.losses == full.losses[1:]
    a, b = load_file(str(full.final)), load_file(str(rest.final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_with_the_lora_makes_the_word_usable_by_flag_and_by_tag(tmp_path):
    from sdtune.generate import GenerationParams, Generator

    data = write_toy_dataset(tmp_path / "d", 2, size=64, caption="a {colour} TOK shape")
    r = train(TrainConfig(method="lora", model="tiny", data=str(data), out=str(tmp_path / "run"), steps=3, lr=1e-3,
                          save_every=0, progress=False, tensorboard=False, output_name="heart",
                          options=LoraOptions(pivotal=True)), **quiet())

    def image(gen, prompt):
        return gen.generate(GenerationParams(prompt=prompt, steps=3, seed=1))[0].image.tobytes()

    with_flag = Generator("tiny", loras=[r.final])
    word = image(with_flag, f"a red {WORD} shape")
    assert word != image(with_flag, "a red shape")                      # the word does something
    base = Generator("tiny")
    assert word != image(base, f"a red {WORD} shape")                   # and is not the base model's text
    tagged = Generator("tiny", lora_dirs=[r.final.parent])
    assert image(tagged, f"a red {WORD} shape <lora:heart:1>") == word  # a prompt tag: the same image
    image(tagged, f"a red {WORD} shape")                                # tag gone: the word goes with the LoRA
    assert WORD not in tagged.embeddings.registry


@pytest.mark.parametrize("argv,message", [
    (["--pivotal", "--pivotal-tokens", "0"], "pivotal_tokens 0 must be between 1 and 16"),
    (["--pivotal", "--pivotal-frac", "0"], "pivotal_frac 0.0 must be in (0, 1]"),
    (["--pivotal", "--pivotal-frac", "nan"], "pivotal_frac must be a finite number"),
    (["--pivotal", "--pivotal-lr", "0"], "pivotal_lr 0.0 must be > 0"),
    (["--pivotal-token", "<w>"], "pivotal_token is set but pivotal tuning is off"),
    (["--pivotal", "--pivotal-token", "my word"], "must be one word"),
    (["--pivotal", "--pivotal-token", "sks", "--pivotal-abstraction", "sks"], "overlap"),
    (["--pivotal", "--format", "diffusers"], "use --format kohya"),
    (["--pivotal", "--prompt", "a photo of a shape"], "contains neither 'TOK'"),
])
def test_bad_pivotal_options_are_one_line_errors_before_loading(tmp_path, data, capsys, argv, message):
    r = run_cli(["train", "lora", "--data", str(data), "--out", str(tmp_path / "o"), *argv], capsys)
    assert r.code == 2 and message in r.text and not (tmp_path / "o").exists()


def test_a_word_of_the_vocabulary_is_refused(tmp_path, data, sd1):
    with pytest.raises(SdtuneError, match="already a word of the vocabulary"):
        train(config(tmp_path, data, pivotal_token="shape", pivotal_abstraction="TOK"), model=copy.deepcopy(sd1),
              **quiet())


def test_the_toy_judge_prompts_with_the_new_word():
    from sdtune.toy.concept_eval import default_term

    c = TrainConfig(method="lora", options=LoraOptions(pivotal=True, pivotal_abstraction="sks",
                                                       prompt="a photo of sks shape"))
    assert default_term(c) == "<s0><s1> shape"
    assert default_term(c.replace(options=LoraOptions(prompt="a photo of sks shape"))) == "sks shape"
