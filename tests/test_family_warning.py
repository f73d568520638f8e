"""A LoRA or embedding of another family (SD1 vs SDXL) is never silently ignored (issue 21 part 4): an embedding is
skipped with one warning naming both families, once per file per Generator, through the CLI, the Python API and
the server; a LoRA is refused with one line naming both families."""

from __future__ import annotations

import logging

import pytest
import torch

from sdtune.adapters.textual_inversion.files import Embedding, write_embedding

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)
LOGGER = "sdtune.adapters.textual_inversion.library"


def sdxl_embedding(folder, name="xlstar"):
    g = torch.Generator().manual_seed(0)
    emb = Embedding(name, {"clip_l": torch.randn(2, 768, generator=g), "clip_g": torch.randn(2, 1280, generator=g)})
    return write_embedding(emb, folder / f"{name}.safetensors", "sdxl")


def family_warnings(messages):
    return [m for m in messages if "it is an SDXL embedding and this model is SD1" in m]


def test_generator_warns_once_per_file_and_names_both_families(tmp_path, caplog):
    from sdtune.generate import GenerationParams, Generator

    sdxl_embedding(tmp_path)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    gen = Generator("tiny", embeddings=[tmp_path])
    params = GenerationParams(prompt="a red xlstar", steps=2, seed=1)
    gen.generate(params)
    gen.generate(params)  # the library refreshes before every run: the unchanged file is not reported again
    msgs = family_warnings(r.getMessage() for r in caplog.records)
    assert len(msgs) == 1, msgs
    assert "xlstar.safetensors" in msgs[0] and "use it with an SDXL model" in msgs[0] and "\n" not in msgs[0]
    assert "xlstar" not in gen.embeddings.names
    caplog.clear()
    Generator("tiny", embeddings=[tmp_path])  # another Generator says it again, once
    assert len(family_warnings(r.getMessage() for r in caplog.records)) == 1


def test_cli_prints_one_warning(tmp_path, capsys):
    from sdtune.cli.testing import run_cli

    sdxl_embedding(tmp_path / "emb")
    r = run_cli(["generate", "a red xlstar", "--steps", "2", "--embeddings", str(tmp_path / "emb"), "--out",
                 str(tmp_path / "out")], capsys)
    assert r.code == 0, r.text
    lines = [ln for ln in r.text.splitlines() if "SDXL embedding" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: skipped embedding 'xlstar'")


def test_server_warns_once_across_requests(tmp_path, caplog):
    from fastapi.testclient import TestClient

    from sdtune.cli.ui import build_settings
    from sdtune.server.app import create_app

    root = tmp_path / "a1111"
    for sub in ("models/Stable-diffusion", "models/Lora", "embeddings"):
        (root / sub).mkdir(parents=True)
    sdxl_embedding(root / "embeddings")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    client = TestClient(create_app(build_settings(listen=False, auth=None, no_api=False, datasets=(tmp_path,),
                                                  data_dir=root, outputs=tmp_path / "outputs",
                                                  runs=tmp_path / "runs")))
    for seed in (1, 2):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red xlstar", "steps": 2, "seed": seed})
        assert r.status_code == 200, r.text
    assert len(family_warnings(r.getMessage() for r in caplog.records)) == 1


def test_lora_of_another_family_is_one_line_naming_both(tmp_path):
    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import random_network
    from sdtune.errors import SdtuneError
    from sdtune.generate import GenerationParams, Generator
    from sdtune.models.testing import tiny_pipeline

    save_lora(random_network(tiny_pipeline("sdxl"), seed=1), tmp_path / "xl.safetensors")
    gen = Generator("tiny")
    with pytest.raises(SdtuneError) as err:
        gen.set_loras([(tmp_path / "xl.safetensors", 1.0)])
        gen.generate(GenerationParams(prompt="a red circle", steps=2, seed=1))
    text = str(err.value)
    assert "SDXL" in text and "SD1" in text and "\n" not in text
