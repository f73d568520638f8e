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
