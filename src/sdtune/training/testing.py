"""Helpers for tests of the training loop: tiny models wrapped as `LoadedModel` (toy datasets: `sdtune.toy.testing`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_loaded(family: str = "sd1", seed: int = 0) -> Any:
    """A `LoadedModel` around `models.testing.tiny_pipeline(family)` (random weights, CPU, fp32)."""
    from sdtune.models.loading import LoadedModel
    from sdtune.models.testing import tiny_pipeline

    pipe = tiny_pipeline(family, seed)
    pred = pipe.scheduler.config.get("prediction_type", "epsilon")
    return LoadedModel(pipe=pipe, family=family, prediction_type=pred, name=f"tiny-{family}", hash="0" * 10,
                       source=Path(f"<tiny-{family}>"), device=torch.device("cpu"), dtype=torch.float32)


def quick_config(tmp_path: Path, data: Path, method: str = "lora", options: Any = None, **changes: Any) -> Any:
    """A `TrainConfig` for a seconds-long test run on the tiny model: 2 steps at 32 px into tmp_path/out, no
    checkpoints between, no progress bar; `changes` override any field."""
    from sdtune.training.config import TrainConfig

    fields: dict[str, Any] = dict(method=method, data=str(data), out=str(tmp_path / "out"), steps=2, lr=1e-4,
                                  resolution=32, save_every=0, progress=False, tensorboard=False, sample_steps=2)
    if options is not None:
        fields["options"] = options
    fields.update(changes)
    return TrainConfig(**fields)
