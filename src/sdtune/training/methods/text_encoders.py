"""Training the text encoder(s) next to the UNet at their own learning rate (`lora --text-encoder`, `dreambooth
--train-text-encoder`): the one rule for which encoders a pipeline has, the option check and the param group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    from sdtune.training.config import TrainConfig

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def text_encoders_of(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the pipeline's text encoders (SDXL has two)."""
    return [(n, getattr(pipe, n)) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]


def check_text_encoder_lr(lr: float | None, trained: bool, flag: str) -> None:
    """A text-encoder learning rate must be >= 0 and only given when the text encoder trains (`flag` turns that
    on)."""
    if lr is None:
        return
    if not lr >= 0:
        raise SdtuneError(f"text_encoder_lr {lr} must be >= 0")
    if not trained:
        raise SdtuneError(f"text_encoder_lr is set but the text encoder is not trained; add {flag}")


def text_encoder_group(params: list[torch.nn.Parameter], config: TrainConfig, lr: float | None) -> dict[str, Any]:
    """The optimizer param group of the text encoders: `lr` (default: the run's --lr) as a scale of the run's peak
    learning rate, so it follows the same schedule."""
    from sdtune.training.schedules import LRSchedule

    peak = LRSchedule.from_config(config.lr, config.lr_scheduler, config.warmup_steps, config.total_steps).peak
    return {"params": params, "lr_scale": 1.0 if lr is None else lr / peak}
