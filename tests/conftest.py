"""Shared fixtures. Tests never touch the network and build their models from configs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: one thread avoids sync overhead


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory):
    """A randomly initialised tiny SD1-architecture pipeline saved as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    from sdtune.toy.tiny import build_components

    out = tmp_path_factory.mktemp("tiny_random")
    comps = build_components(seed=0, tokenizer_dir=out / "tokenizer")
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture
def hash_cache(tmp_path_factory, monkeypatch):
    """Model hashes cached under the test run's temporary folder, not ~/.cache (`pytest.mark.usefixtures`)."""
    monkeypatch.setenv("SDTUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sdtune-cache"))


@pytest.fixture(scope="module")
def sd1():
    """A tiny random SD1 LoadedModel (copy it before training: the module's tests share it)."""
    from sdtune.training.testing import tiny_loaded

    return tiny_loaded("sd1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 32px toy-world training images with captions; modules that need other data define their own."""
    from sdtune.toy.testing import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("data"), 2, size=32)


@pytest.fixture(scope="module")
def sks_data(tmp_path_factory):
    """Four 32px hearts captioned "a {colour} sks shape": a concept named by an identifier (prior, keep-base,
    DreamBooth's identifier row)."""
    from sdtune.toy.testing import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("sks"), 4, size=32, shapes=("heart",),
                             caption="a {colour} sks shape")
