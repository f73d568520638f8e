"""Automatic prior preservation (issue 21 part 4): with no --class-prompt, DreamBooth (by default) and LoRA (with
--prior-preservation or --identifier) find the identifier in the captions and make class images from the captions
without it; the identifier detection; the one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.training import train
from sdtune.training.testing import quick_config
from sdtune.training.identifier import class_prompts, common_words, detect_identifier, without_identifier
from sdtune.training.methods.dreambooth import DreamBoothOptions
from sdtune.training.methods.lora import LoraOptions

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    from sdtune.models import load_model

    return load_model("tiny").pipe.tokenizer


@pytest.fixture(scope="module")
def sks_data(tmp_path_factory):
    from sdtune.toy.testing import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("sks"), 3, size=32, shapes=("heart",),
                             caption="a {colour} sks shape")


def config(tmp_path, data, method="lora", options=None, **kw):
    return quick_config(tmp_path, data, method, options if options is not None else LoraOptions(num_class_images=4), **kw)


# ------------------------------------------------------------------------------------------------- detection

def test_detection_takes_the_conventional_or_the_unknown_word_and_never_the_class_noun(tokenizer):
    caps = ["a red sks shape on a blue background", "a green sks shape", "A sks shape, cropped"]
    assert common_words(caps) == ["a", "sks", "shape"]
    assert detect_identifier(caps, tokenizer) == "sks"
    assert detect_identifier(["a photo of ohwx dog", "ohwx dog on a bed"], None) == "ohwx"
    assert detect_identifier(["a <heart-01> on a rug", "two <heart-01>"], None) == "<heart-01>"
    # a word the tokenizer does not know as one token, when it is the only such common word
    assert detect_identifier(["a red qzt shape", "a blue qzt shape on a white background"], tokenizer) == "qzt"
    # no identifier: a style set, or captions sharing only ordinary words
    assert detect_identifier(["a red circle on a white background", "a blue square on a black background"],
                             tokenizer) is None
    assert detect_identifier(["", "  "], tokenizer) is None


def test_captions_without_the_identifier():
    assert without_identifier("a red sks shape on a blue background", "sks") == "a red shape on a blue background"
    assert without_identifier("sks, a photo of a dog", "sks") == "a photo of a dog"
    assert without_identifier("a photo of SKS dog , smiling", "sks") == "a photo of dog, smiling"
    assert without_identifier("a sksy sks", "sks") == "a sksy"  # whole words only
    assert class_prompts(["a red sks shape", "a red sks shape", "a blue sks shape", "sks"], "sks") == \
        ["a blue shape", "a red shape"]


# ------------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_default_run_generates_class_images_from_the_captions_without_the_identifier(tmp_path, sks_data, sd1,
                                                                                      method):
    from safetensors import safe_open

    opts = LoraOptions(prior_preservation=True, num_class_images=4) if method == "lora" else \
        DreamBoothOptions(num_class_images=4, save_precision="fp32", diffusers_folder=False)
    msgs: list[str] = []
    r = train(config(tmp_path, sks_data, method, opts), model=copy.deepcopy(sd1), echo=msgs.append)
    folders = list((r.out / "class_images").iterdir())
    assert len(folders) == 1
    pngs, txts = sorted(folders[0].glob("*.png")), sorted(folders[0].glob("*.txt"))
    assert len(pngs) == 4 and len(txts) == 4
    captions = {(sks_data / f"{i:03d}.txt").read_text() for i in range(3)}
    want = {c.replace("sks ", "") for c in captions}
    assert {t.read_text().strip() for t in txts} == want  # every class prompt is a caption without "sks"
    assert any("identifier 'sks' (found in every caption)" in m for m in msgs)
    with safe_open(str(r.final), "pt") as f:
        meta = f.metadata()
    assert meta["sdtune_identifier"] == "sks" and meta["sdtune_class_prompt"] == "auto: captions without 'sks'"
    # another run into a folder holding them reuses the cached images
    import shutil

    shutil.copytree(r.out / "class_images", tmp_path / "again" / "out" / "class_images")
    msgs.clear()
    train(config(tmp_path / "again", sks_data, method, opts), model=copy.deepcopy(sd1), echo=msgs.append)
    assert any("reusing 4 cached class image(s)" in m for m in msgs)


def test_auto_prior_changes_the_objective(tmp_path, sks_data, sd1):
    on = train(config(tmp_path / "on", sks_data, options=LoraOptions(identifier="sks", num_class_images=4)),
               model=copy.deepcopy(sd1), echo=lambda s: None)
    off = train(config(tmp_path / "off", sks_data), model=copy.deepcopy(sd1), echo=lambda s: None)  # lora default
    assert all(a > b for a, b in zip(on.losses, off.losses))  # instance loss + a positive prior term
    assert not (off.out / "class_images").exists()


def test_no_identifier_turns_the_prior_off_with_one_warning(tmp_path, data, sd1):
    msgs: list[str] = []
    opts = DreamBoothOptions(diffusers_folder=False, save_precision="fp32")  # dreambooth: prior on by default
    r = train(config(tmp_path, data, "dreambooth", opts), model=copy.deepcopy(sd1), echo=msgs.append)
    warns = [m for m in msgs if m.startswith("warning: prior preservation is off")]
    assert len(warns) == 1 and "--identifier" in warns[0] and "--class-prompt" in warns[0]
    assert not (r.out / "class_images").exists()


def test_explicit_identifier_and_its_errors(tmp_path, data, sd1):
    caption = (data / "000.txt").read_text()
    word = caption.split()[1]  # the colour of the first image: in one caption only
    msgs: list[str] = []
    train(config(tmp_path, data, options=LoraOptions(identifier=word, num_class_images=2)),
          model=copy.deepcopy(sd1), echo=msgs.append)
    assert any(f"identifier '{word}' (given)" in m for m in msgs)
    with pytest.raises(SdtuneError, match="is in none of the 2 captions"):
        train(config(tmp_path / "b", data, options=LoraOptions(identifier="zzq")), model=copy.deepcopy(sd1),
              echo=lambda s: None)
    with pytest.raises(SdtuneError, match="needs --class-prompt .* or an identifier"):
        train(config(tmp_path / "c", data, "dreambooth", DreamBoothOptions(prior_preservation=True)),
              model=copy.deepcopy(sd1), echo=lambda s: None)
    for bad in ("", "two words"):
        with pytest.raises(SdtuneError, match="must be one word"):
            config(tmp_path, data, options=LoraOptions(identifier=bad)).check_values()
