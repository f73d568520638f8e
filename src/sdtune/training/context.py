"""`TrainingContext`: the part of a run a training method may use, instead of the Trainer itself.

The loop builds one after `TrainingMethod.setup` and hands it to the method's `prepare_data` and `finalize` hooks.
Everything here is public and stable; a method that needs more asks for a new field here, so the loop's internals
stay free to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig
    from sdtune.training.data import DatasetItem
    from sdtune.training.latents import CachedLatent


@dataclass(frozen=True)
class TrainingContext:
    """What a method sees of its run.

    encode_images: PIL images or dataset items -> cached latents, with the run's VAE handling (SDXL's VAE in fp32).
    generate_images: (prompts, seeds, **GenerationParams fields) -> PIL images from the live model, at the run's
    resolution and sample settings (e.g. class images for prior preservation).
    map_captions: replace the caption of every training and validation item with `fn(item)` (e.g. `--prompt`)."""

    config: TrainConfig
    model: LoadedModel
    out: Path                  # the run folder
    device: torch.device
    resolution: int
    is_sdxl: bool
    latents_mode: str          # "sample" or "mean" (see training.latents)
    echo: Callable[[str], None]
    encode_images: Callable[[list[Any]], list[CachedLatent]]
    generate_images: Callable[..., list[Image.Image]]
    map_captions: Callable[[Callable[[DatasetItem], str]], None]
