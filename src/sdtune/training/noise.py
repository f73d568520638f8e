"""The diffusion objective: noise, timesteps, noisy latents and the prediction target, from the model's own
scheduler config (`DDPMScheduler.from_config`), so SD1 (epsilon), SD2-v (v_prediction) and SDXL train against
what their samplers expect.

Random numbers come from a CPU `torch.Generator` handed in by the loop (one per micro-batch, derived from the
seed and the step), so a step's noise does not depend on the device or on what ran before it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch


def step_generator(seed: int, step: int, micro: int = 0, stream: str = "train") -> torch.Generator:
    """A CPU generator for one micro-batch, a pure function of (seed, step, micro, stream)."""
    digest = hashlib.blake2b(f"{stream}:{seed}:{step}:{micro}".encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class NoiseModel:
    """Forward diffusion and the training loss for one model."""

    def __init__(self, scheduler_config: Mapping[str, Any], prediction_type: str, *, noise_offset: float = 0.0,
                 min_snr_gamma: float = 0.0) -> None:
        from diffusers import DDPMScheduler

        cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        cfg["prediction_type"] = prediction_type
        self.scheduler = DDPMScheduler.from_config(cfg)
        self.prediction_type = prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {prediction_type!r}")
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.noise_offset = float(noise_offset)
        self.min_snr_gamma = float(min_snr_gamma)
        acp = self.scheduler.alphas_cumprod.float()
        self.snr = acp / (1.0 - acp)

    def sample(self, latents: torch.Tensor, generator: torch.Generator, *, total: int = 0,
               offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise like latents, timesteps (B,)) drawn on the CPU from `generator`, moved to latents' device.

        total/offset: `latents` are rows [offset, offset + B) of a global batch of `total` split over processes;
        the draws are the global batch's, sliced, so each sample's noise is what one process would give it."""
        b, c = latents.shape[:2]
        n = max(total, b)
        shape = (n, *latents.shape[1:])
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((n, c, 1, 1), generator=generator, dtype=torch.float32)
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator)
        if n != b:
            noise, t = noise[offset:offset + b], t[offset:offset + b]
        return noise.to(latents.device), t.to(latents.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        return noise

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma loss weights per sample, or None when off."""
        if not self.min_snr_gamma:
            return None
        snr = self.snr.to(t.device)[t]
        w = torch.clamp(snr, max=self.min_snr_gamma) / snr
        if self.prediction_type == "v_prediction":
            w = torch.clamp(snr, max=self.min_snr_gamma) / (snr + 1.0)
        return w

    @staticmethod
    def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error of each sample (float32), unweighted (validation compares these across runs)."""
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean squared error per sample (float32), weighted by min-SNR when on, averaged over the batch."""
        per = self.per_sample_mse(pred, target)
        w = self.weights(t)
        if w is not None:
            per = per * w
        return per.mean()
