"""A training run's folder given as a source of adapters (`--embeddings runs/star`, `--lora-dir runs/heart`, as the
README shows): its resumable state (`state/step-*/` with weights, optimizer and RNG files) is never read as an
embedding or offered as a LoRA. `--embeddings RUN_DIR` used to load state/.../weights.safetensors as the words
"weights" and "clip_l", silently replacing ordinary prompt words."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtune.adapters.textual_inversion import Embedding, EmbeddingLibrary, write_embedding
from sdtune.errors import SdtuneError

torch.set_num_threads(1)


def run_folder(root: Path, result: str) -> Path:
    """A run folder as the loop leaves it: the result, a checkpoint, and one resumable state."""
    (root / "checkpoints").mkdir(parents=True)
    state = root / "state" / "step-000040-18eedcd7f1d29f4a"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{}")
    for name in ("weights", "optimizer", "rng"):
        save_file({"clip_l": torch.zeros(1, 64)}, str(state / f"{name}.safetensors"))
    return root


def test_embeddings_from_a_run_folder_are_the_result_and_its_checkpoints_only(tmp_path):
    from sdtune.models.testing import tiny_pipeline

    run = run_folder(tmp_path / "star", "star")
    emb = Embedding("star", {"clip_l": torch.randn(2, 64)}, token="<star>", step=40)
    write_embedding(emb, run / "star.safetensors", "safetensors")
    write_embedding(emb, run / "checkpoints" / "star-000040.safetensors", "safetensors")
    messages: list[str] = []
    lib = EmbeddingLibrary([run], pipe=tiny_pipeline("sd1"), echo=messages.append)
    assert lib.names == ["<star>", "star", "star-000040"]
    assert not any("state" in m for m in messages)  # not even a "skipped" warning for the state's files


def test_lora_tags_do_not_see_a_runs_state_files(tmp_path):
    from sdtune.adapters.lora.tags import resolve_lora_tags

    run = run_folder(tmp_path / "heart", "heart")
    save_file({"x": torch.zeros(1)}, str(run / "heart.safetensors"))
    assert resolve_lora_tags([("heart", 1.0)], [run]) == [(run / "heart.safetensors", 1.0)]
    with pytest.raises(SdtuneError, match="available: heart$"):
        resolve_lora_tags([("weights", 1.0)], [run])
