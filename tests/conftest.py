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
