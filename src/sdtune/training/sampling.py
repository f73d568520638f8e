"""Evaluation and sample images of a running training (`training.loop`): the fixed-noise validation loss, the
evaluator's metrics at each checkpoint, and images from the live weights through the same Generator as `sdtune
generate` (the method decides how its current weights are used: `TrainingMethod.apply_for_sampling`).

`TrainerSampling` is a part of `Trainer` (a mixin): it holds no state of its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch

from sdtune.atomic import atomic_path
from sdtune.errors import SdtuneError
from sdtune.training.config import TrainConfig
from sdtune.training.methods import Batch, UNetConditioning, TrainingMethod
from sdtune.training.methods.base import TargetFn
from sdtune.training.parts import TrainerParts
from sdtune.training.runlog import RunLog


if TYPE_CHECKING:
    from PIL import Image

    from sdtune.generate.generator import Generator
    from sdtune.models.loading import LoadedModel


@dataclass
class EvalContext:
    """What an evaluator gets at each checkpoint. `generate(...)` makes images with the current weights."""

    step: int
    checkpoint: Path
    trainer: Any  # the running `training.loop.Trainer`

    @property
    def model(self) -> LoadedModel:
        return self.trainer.model

    @property
    def method(self) -> TrainingMethod:
        return self.trainer.method

    @property
    def config(self) -> TrainConfig:
        return self.trainer.config

    def generate(self, prompts: list[str] | str, seeds: list[int] | int, **params: Any) -> list[Image.Image]:
        """PIL images for every (prompt, seed), prompt-major; params override GenerationParams fields."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        return self.trainer.generate_images(prompts, seeds, **params)


Evaluator = Callable[[EvalContext], Mapping[str, float]]


class TrainerSampling(TrainerParts):
    """Validation, evaluation and samples (see the module docstring)."""

    log: RunLog | None

    if TYPE_CHECKING:
        def _unet_loss(self, latents: torch.Tensor, cond: UNetConditioning, noise: torch.Tensor, t: torch.Tensor,
                       reduce: bool = True, target_fn: TargetFn | None = None) -> torch.Tensor: ...


    @contextlib.contextmanager
    def _side_work(self) -> Iterator[None]:
        """Evaluation and sampling: global RNG untouched (training stays bit-identical), modules in eval mode."""
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        mods = self.method.modules()
        modes = [m.training for m in mods]
        with torch.random.fork_rng(devices=devices):
            for m in mods:
                m.eval()
            try:
                yield
            finally:
                for m, was in zip(mods, modes):
                    m.train(was)

    def validation_loss(self) -> float | None:
        """The fixed-noise validation loss of the current weights (None without a validation set)."""
        if self.val is None:
            return None

        def per_sample(lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, caps: list[str],
                       ids: torch.Tensor | None) -> torch.Tensor:
            cond = self.method.conditioning(Batch(latents=lat, captions=caps, time_ids=ids, step=self.step))
            return self._unet_loss(lat, cond, noise, t, reduce=False)

        with self._side_work(), torch.no_grad(), self.accelerator.autocast():
            return self.val.loss(per_sample, self.device, batch_size=max(1, self.config.batch_size))

    def _evaluate(self, step: int, path: Path | None) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.val is not None:
            metrics["val_loss"] = self.validation_loss()
        if self.evaluator is not None and path is not None:
            with self._side_work():
                extra = self.evaluator(EvalContext(step=step, checkpoint=path, trainer=self))
            for k, v in dict(extra or {}).items():
                if k in ("step", "file", "train_loss", "best") or not isinstance(v, (int, float)) \
                        or isinstance(v, bool):
                    raise SdtuneError(f"the evaluator returned {k}={v!r}; metrics must be numbers with other names")
                metrics[k] = float(v)
        return metrics

    # ============================================================================================= samples

    def generator(self) -> Generator:
        if self._generator is None:
            from sdtune.generate import Generator

            self._generator = Generator(model=self.model)
        return self._generator

    def generate_images(self, prompts: list[str], seeds: list[int], **params: Any) -> list[Image.Image]:
        from sdtune.generate import GenerationParams

        cfg = self.config
        base: dict[str, Any] = dict(negative_prompt=cfg.sample_negative, steps=cfg.sample_steps,
                                    cfg_scale=cfg.sample_cfg, width=self.resolution, height=self.resolution)
        if cfg.sample_sampler:
            base["sampler"] = cfg.sample_sampler
        base.update(params)
        gen = self.generator()
        images = []
        with self._side_work(), self.method.apply_for_sampling(gen) as g:
            for prompt in prompts:
                for seed in seeds:
                    images += [r.image for r in g.generate(GenerationParams(prompt=prompt, seed=seed, **base))]
        return images

    def save_samples(self, step: int) -> Path:
        """One grid of every sample prompt x seed with the current weights: OUT/samples/<name>-<step>.png."""
        from sdtune.generate.grid import make_grid

        cfg = self.config
        images = self.generate_images(cfg.sample_prompts, cfg.sample_seeds)
        grid = make_grid(images)
        path = self.out / "samples" / f"{cfg.name}-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        assert self.log is not None  # _run opened it
        self.log.event("samples", step, file=path.relative_to(self.out).as_posix())
        return path
