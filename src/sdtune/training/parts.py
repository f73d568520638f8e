"""`TrainerParts`: the attributes `Trainer` sets (in `__init__` and while preparing a run) and the methods it provides,
declared once for the type checker, so that the Trainer's parts (`setup.TrainerSetup`, `sampling.TrainerSampling`)
can use them. It holds nothing at run time."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from sdtune.generate.generator import Generator
    from sdtune.training.batches import BatchSource
    from sdtune.training.checkpoint import StateStore
    from sdtune.training.config import TrainConfig
    from sdtune.training.data import DatasetItem
    from sdtune.training.distributed import Ranks
    from sdtune.training.latents import LatentStore
    from sdtune.training.ledger import CheckpointLedger
    from sdtune.training.methods import TrainingMethod
    from sdtune.training.noise import NoiseModel
    from sdtune.training.validation import ValidationSet


class TrainerParts:
    # set by Trainer.__init__ / run (see `training.loop.Trainer`)
    config: TrainConfig
    model: Any
    evaluator: Any
    out: Path
    store: StateStore
    device: torch.device
    step: int
    batches: BatchSource | None
    ledger: CheckpointLedger
    is_sdxl: bool
    resolution: int
    latents_mode: str
    unet: Any
    noise: NoiseModel
    accelerator: Any
    ranks: Ranks
    val: ValidationSet | None
    val_items: list[DatasetItem]
    _generator: Generator | None
    _method: TrainingMethod | None
    _given_model: bool
    latent_store: LatentStore | None

    if TYPE_CHECKING:  # provided by Trainer; declared for the type checker only (never in the MRO)
        @property
        def method(self) -> TrainingMethod: ...

        def echo(self, text: str) -> None: ...

        def generate_images(self, prompts: list[str], seeds: list[int], **params: Any) -> list[Image.Image]: ...
