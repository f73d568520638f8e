"""Knowing when to stop: a validation loss at fixed noise and timesteps, and best-checkpoint selection with
early stopping.

The validation loss of a checkpoint is the mean noise-prediction error over every held-out image at the same
`n` timesteps spread over [50, 950] with the same noise, drawn once from the run's seed. It is therefore
deterministic and comparable across checkpoints of a run (and across runs with the same seed and images),
unlike the training loss, whose noise and timesteps change every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from sdtune.training.noise import step_generator

# (latents (B,C,h,w), noise, timesteps (B,), captions, time_ids (B,6) or None) -> per-sample losses (B,)
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[str], "torch.Tensor | None"], torch.Tensor]


def fixed_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """n timesteps spread evenly over [50, 950] (scaled to the scheduler's range); n = 1 gives the middle."""
    lo, hi = 0.05 * num_train_timesteps, 0.95 * num_train_timesteps
    if n == 1:
        return torch.tensor([round((lo + hi) / 2)], dtype=torch.long)
    return torch.linspace(lo, hi, n).round().long()


@dataclass
class ValidationSet:
    """Held-out latents (posterior means), their captions and time ids, with noise and timesteps fixed once."""

    latents: list[torch.Tensor]           # (C, h, w) each, CPU float32
    captions: list[str]
    time_ids: list[torch.Tensor | None]
    timesteps: torch.Tensor               # (K,)
    noise: list[torch.Tensor]             # (K, C, h, w) each

    @classmethod
    def build(cls, latents: list[torch.Tensor], captions: list[str], time_ids: list[torch.Tensor | None], *,
              n_timesteps: int, seed: int, num_train_timesteps: int = 1000) -> ValidationSet:
        g = step_generator(seed, 0, 0, stream="validation")
        ts = fixed_timesteps(n_timesteps, num_train_timesteps)
        noise = [torch.randn((len(ts), *lat.shape), generator=g, dtype=torch.float32) for lat in latents]
        return cls(list(latents), list(captions), list(time_ids), ts, noise)

    def __len__(self) -> int:
        return len(self.latents)

    @torch.no_grad()
    def loss(self, per_sample: PerSampleLoss, device: torch.device | str, batch_size: int = 8) -> float:
        """Mean loss over every (image, timestep) pair, evaluated in chunks of `batch_size`."""
        total, count = 0.0, 0
        k = len(self.timesteps)
        for lat, cap, tid, noise in zip(self.latents, self.captions, self.time_ids, self.noise):
            for start in range(0, k, batch_size):
                ts = self.timesteps[start:start + batch_size]
                n = len(ts)
                lats = lat.unsqueeze(0).expand(n, *lat.shape).to(device)
                ids = None if tid is None else tid.unsqueeze(0).expand(n, -1).to(device)
                losses = per_sample(lats, noise[start:start + n].to(device), ts.to(device), [cap] * n, ids)
                total += float(losses.float().sum())
                count += n
        return total / max(1, count)


class Selection:
    """Best checkpoint by one metric, and early stopping after `patience` evaluations without an improvement
    larger than `min_delta` (an improvement smaller than that neither resets the count nor becomes the best)."""

    def __init__(self, metric: str, mode: str, patience: int | None = None, min_delta: float = 0.0) -> None:
        self.metric, self.mode = metric, mode
        self.patience, self.min_delta = patience, min_delta
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad = 0

    def improves(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        if self.mode == "min":
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def update(self, step: int, value: float | None) -> bool:
        """Record an evaluation; True when it is the new best."""
        if value is not None and self.improves(value):
            self.best_value, self.best_step, self.bad = float(value), step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")
        self.bad = int(state.get("bad", 0))
