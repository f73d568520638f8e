"""THE training loop, shared by every method (`training.methods`).

    from sdtune.training import TrainConfig, train
    result = train(TrainConfig(method="lora", data="data/heart", out="runs/heart", steps=500, lr=1e-4))

What the loop guarantees:
* Everything is validated before training starts (config values, paths, a writable output folder, the model's
  family and resolution, the dataset), with one-line `SdtuneError`s.
* Determinism: for a given seed on the same machine the loss sequence is identical. Data order and augmentations
  depend only on (seed, epoch, position), noise/timesteps/latent samples on (seed, step, micro-batch).
* Never losing progress: OUT/state holds the last complete resumable state (weights, optimizer, RNG states,
  data position, history, config), written atomically (see `training.checkpoint`); SIGINT/SIGTERM save and
  stop cleanly; `resume` continues so that the per-step losses equal an uninterrupted run's.
* A non-finite loss, gradient or weight rolls back to the last good state and stops with the likely cause;
  non-finite weights are never written.
* Checkpoints every `save_every` steps are evaluated (fixed-noise validation loss, optional `evaluator`
  metrics); early stopping and best-checkpoint selection; the final file is the best checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from sdtune.errors import SdtuneError
from sdtune.models.family import KOHYA_BASE_MODEL_VERSION
from sdtune.training.batches import BatchSource
from sdtune.training.checkpoint import StateStore, link_or_copy
from sdtune.training.config import TrainConfig
from sdtune.training.distributed import SINGLE, Ranks, launched_as_other_rank
from sdtune.training.methods import Batch, UNetConditioning, TrainingMethod
from sdtune.training.methods.base import Diverged, TargetFn
from sdtune.training.noise import step_generator
from sdtune.training.runlog import RunLog, SilentLog, format_summary, write_summary
from sdtune.training.recovery import TrainerRecovery
from sdtune.training.sampling import Evaluator, TrainerSampling
from sdtune.training.setup import TrainerSetup

if TYPE_CHECKING:

    from sdtune.generate.generator import Generator
    from sdtune.training.data import DatasetItem
    from sdtune.training.latents import LatentStore


@dataclass
class TrainResult:
    out: Path
    step: int                       # the last completed step
    stopped: str                    # finished | early_stop | interrupted | diverged
    final: Path | None              # OUT/<name><ext>: the best checkpoint (None when interrupted or none saved)
    best_step: int | None
    rows: list[dict[str, Any]]      # one per evaluated checkpoint (as in summary.json)
    losses: list[float]             # this session's per-step losses
    message: str = ""
    signal: int | None = None       # the signal that interrupted the run

    @property
    def log(self) -> Path:
        return self.out / "log.jsonl"


class TrainingDiverged(SdtuneError):
    """The loss, gradients or weights became NaN/Inf; the run was rolled back to the last good state."""

    def __init__(self, message: str, result: TrainResult | None = None) -> None:
        super().__init__(message)
        self.result = result


def _finite(tensors: Any) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


class Trainer(TrainerSetup, TrainerSampling, TrainerRecovery):
    """One training run. `run()` validates, prepares, trains and returns a `TrainResult`.

    method: a `TrainingMethod` instance (default: `METHODS[config.method](config.options)`).
    model: an already loaded `LoadedModel` to train in place (default: `load_model(config.model, ...)`).
    evaluator: called at every checkpoint with an `EvalContext`; returns extra metrics {name: float}.
    on_step: called after every optimizer step with (trainer, step, loss); may call `request_stop()`.
    handle_signals: SIGINT/SIGTERM stop after the current step with the state saved (main thread only).
    latent_store: a `training.latents.LatentStore` shared with other runs of this process (cross-validation folds:
    `training.crossval`), so images it holds are not encoded again."""

    val_items: list[DatasetItem]  # the held-out validation items (set while preparing the data)

    def __init__(self, config: TrainConfig, *, method: TrainingMethod | None = None, model: Any = None,
                 evaluator: Evaluator | None = None, on_step: Callable[[Trainer, int, float], None] | None = None,
                 handle_signals: bool = True, echo: Callable[[str], None] | None = None,
                 latent_store: LatentStore | None = None) -> None:
        self.config = config
        self.latent_store = latent_store
        self._method = method
        self.model = model
        self._given_model = model is not None
        self.evaluator = evaluator
        self.on_step = on_step
        self.handle_signals = handle_signals
        self._echo = echo
        self.step = 0
        self.batches: BatchSource | None = None  # the data stream and its resumable position (epoch, cursor)
        self.losses: list[float] = []
        self._stop: str | None = None
        self._signal: int | None = None
        self._generator: Generator | None = None
        self._fp16_skips = 0
        self.log: RunLog | None = None
        self.ranks: Ranks = SINGLE  # several processes: set while preparing (`training.distributed`)

    # ================================================================================================ public

    @property
    def method(self) -> TrainingMethod:
        """The training method: the one passed in, or the config's (chosen when the run starts)."""
        if self._method is None:
            raise RuntimeError("the training method is chosen when the run starts")
        return self._method

    @property
    def epoch(self) -> int:
        return self.batches.epoch if self.batches is not None else 0

    @property
    def cursor(self) -> int:
        return self.batches.cursor if self.batches is not None else 0

    def request_stop(self, reason: str = "interrupted") -> None:
        """Stop after the current step; the state is saved and the run can be resumed."""
        self._stop = reason

    def echo(self, text: str) -> None:
        if not self.ranks.is_main:  # one copy of every message: the main process's
            return
        if self.log is not None:
            self.log.message(text)
        elif self._echo is not None:
            self._echo(text)
        else:
            import sys

            print(text, file=sys.stderr, flush=True)

    def run(self) -> TrainResult:
        cfg = self.config
        cfg.check_values(method=type(self._method) if self._method is not None else None)
        if cfg.cv_folds and cfg.cv_fold is None:
            raise SdtuneError(f"cv_folds {cfg.cv_folds} means {cfg.cv_folds} runs: call "
                              "sdtune.training.crossval.cross_validate(config) (the CLI and the UI do), not train()")
        if cfg.steps == "auto":
            from sdtune.training.folds import resolve_auto_steps

            self.config = cfg = resolve_auto_steps(cfg, self.echo)
        if self._method is not None:
            type(self._method).check_options(self._method.options, cfg)
        cfg.check_paths(model=not self._given_model)
        self._precheck()
        self.out = cfg.out_dir
        self.store = StateStore(self.out / "state", keep=cfg.keep_states)
        if not launched_as_other_rank():  # the main process holds the output folder for all of them
            self.store.lock()
        try:
            return self._run()
        finally:
            self.store.unlock()

    # ================================================================================================ the step

    def _unet_loss(self, latents: torch.Tensor, cond: UNetConditioning, noise: torch.Tensor, t: torch.Tensor,
                   reduce: bool = True, target_fn: TargetFn | None = None) -> torch.Tensor:
        noisy = self.noise.add_noise(latents, noise, t)
        target = self.noise.target(latents, noise, t) if target_fn is None else target_fn(noisy, t)
        pred = self.unet(noisy, t, **cond.unet_kwargs()).sample
        if reduce:
            return self.noise.loss(pred, target, t)
        return self.noise.per_sample_mse(pred, target)

    def diffusion_loss(self, latents: torch.Tensor, cond: UNetConditioning, gen: torch.Generator,
                       target: TargetFn | None = None) -> torch.Tensor:
        """The noise-prediction loss of `latents` under `cond`, noise and timesteps drawn from `gen`; `target`
        (noisy latents, timesteps) -> the prediction to match instead of the noise (distillation)."""
        noise, t = self.noise.sample(latents, gen)
        return self._unet_loss(latents, cond, noise, t, target_fn=target)

    def _loss(self, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        cond = self.method.conditioning(batch)
        # The global batch's draws, this rank's rows of them (see `training.distributed`).
        noise, t = self.noise.sample(batch.latents, gen, total=batch.total, offset=batch.offset)
        loss = self._unet_loss(batch.latents, cond, noise, t)
        extra = self.method.extra_loss(batch, lambda lat, c, target=None: self.diffusion_loss(lat, c, gen, target))
        return loss if extra is None else loss + extra

    def _optimizer_step(self, step: int) -> tuple[float, float | None]:
        """One optimizer step of `grad_accum` micro-batches; returns (mean loss, gradient norm)."""
        cfg = self.config
        lr = self.schedule(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        total, norm = 0.0, None
        for micro in range(cfg.grad_accum):
            gen = step_generator(cfg.seed, step, micro)
            assert self.batches is not None  # _prepare made it
            batch = self.batches.next(step, gen)
            with self.accelerator.accumulate(*self.method.modules()):
                with self.accelerator.autocast():
                    loss = self._loss(batch, gen)
                value = float(loss.detach())
                if self.ranks.distributed:
                    # The global batch's loss (NaN on every rank when it is on one: all roll back together); each
                    # rank's loss weighted by its share, so the averaged gradients are the global batch's.
                    value = self.ranks.sum(value * batch.share)
                    loss = loss * (batch.share * self.ranks.world)
                if not math.isfinite(value):
                    raise Diverged(step, "loss")
                self.accelerator.backward(loss)
                total += value / cfg.grad_accum
                if self.accelerator.sync_gradients:
                    self.ranks.average_grads(self.params)
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                    norm_t = self.accelerator.clip_grad_norm_(self.params, max_norm)
                    norm = float(norm_t) if norm_t is not None else None
                    if norm is not None and not math.isfinite(norm) and self.accelerator.scaler is None:
                        raise Diverged(step, "gradients")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.method.after_optimizer_step(step)
        if self.accelerator.scaler is not None:  # fp16: inf gradients skip the step and lower the loss scale
            self._fp16_skips = self._fp16_skips + 1 if self.accelerator.optimizer_step_was_skipped else 0
            if self._fp16_skips >= 20:
                raise Diverged(step, "gradients (fp16 overflow in 20 steps in a row)")
        if not _finite(p.detach() for p in self.params):
            raise Diverged(step, "weights")
        return total, norm

    def _train(self) -> str:
        cfg = self.config
        assert self.log is not None  # _run opened it
        while self.step < cfg.total_steps:
            if self.ranks.any(self._stop is not None):  # a signal or request on any process stops them all
                self._stop = self._stop or "interrupted"
                return "interrupted"
            step = self.step + 1
            loss, norm = self._optimizer_step(step)
            self.step = step
            self.losses.append(loss)
            self.ledger.add_loss(loss)
            extra: dict[str, float] = {"epoch": self.epoch}
            if norm is not None and math.isfinite(norm):
                extra["grad_norm"] = round(norm, 6)
            self.log.step(step, loss, self.schedule(step), **extra)
            if self.on_step is not None:
                self.on_step(self, step, loss)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.total_steps:
                self._checkpoint(step)
                sel = self.ledger.selection
                if sel.should_stop:
                    self.log.event("early_stop", step, best_step=sel.best_step)
                    self.echo(f"early stop at step {step}: no improvement of {sel.metric} in "
                              f"{sel.patience} evaluation(s); best was step {sel.best_step}")
                    return "early_stop"
            if cfg.sample_every and step % cfg.sample_every == 0 and self.ranks.is_main:
                self.save_samples(step)
        return "interrupted" if self.ranks.any(self._stop is not None) else "finished"

    # ============================================================================================ checkpoints

    def _metadata(self, step: int) -> dict[str, str]:
        m = self.model
        meta = {"sdtune_method": self.method.name, "sdtune_base_model": str(m.name),
                "sdtune_base_model_hash": str(m.hash), "sdtune_family": m.family,
                "sdtune_prediction_type": m.prediction_type, "sdtune_steps": str(self.config.total_steps),
                "sdtune_seed": str(self.config.seed), "sdtune_resolution": str(self.resolution),
                "sdtune_config": json.dumps(self.config.replace(resume=None).to_dict())}
        if m.family in KOHYA_BASE_MODEL_VERSION:
            meta["ss_base_model_version"] = KOHYA_BASE_MODEL_VERSION[m.family]
        meta.update(self.dataset.metadata())
        return meta

    def checkpoint_path(self, step: int) -> Path:
        return self.out / "checkpoints" / f"{self.config.name}-{step:06d}{self.method.file_ext}"

    def _checkpoint(self, step: int) -> None:
        if not _finite(self.method.state_dict().values()):
            raise Diverged(step, "weights")
        with self.ledger.averaged(self.method, self.device):
            path = self.checkpoint_path(step)
            metrics: dict[str, Any] = {}
            if self.ranks.is_main:  # one file, one evaluation; every rank records the same metrics
                path = self.method.save(path, step, self._metadata(step))
                metrics = self._evaluate(step, path)
            path, metrics = self.ranks.broadcast((path, metrics))
        row = self.ledger.record(step, path, metrics)
        self._save_state()
        self._write_summary()
        assert self.log is not None  # _run opened it
        self.log.event("checkpoint", step, **{k: v for k, v in row.items() if k != "step"})

    def best_step(self) -> int | None:
        return self.ledger.best_step()

    # ============================================================================================= the run

    def _write_summary(self) -> None:
        if not self.ranks.is_main:
            return
        final = self.out / f"{self.config.name}{self.method.file_ext}"
        sel = self.ledger.selection
        info = {"method": self.method.name, "step": self.step, "steps": self.config.total_steps,
                "best_step": self.best_step(), "select_by": sel.metric if self.ledger.selecting else "last",
                "final": final.name if final.exists() else None}
        self._summary_rows = self.ledger.summary_rows()
        write_summary(self.out, self._summary_rows, info)

    def _finish(self, stopped: str, message: str = "") -> TrainResult:
        final = None
        best = self.best_step()
        if stopped != "interrupted" and best is not None and self.ranks.is_main:
            src = self.out / self.ledger.row(best)["file"]
            if src.exists():
                final = link_or_copy(src, self.out / f"{self.config.name}{self.method.file_ext}")
                self.method.finalize(final, src, self.context())  # e.g. DreamBooth's diffusers folder
        self._write_summary()
        if self.log is not None:
            self.log.event("end", self.step, stopped=stopped, best_step=best,
                           final=final.name if final else None)
        if self.ledger.rows and self.ranks.is_main:
            self.echo(format_summary(self._summary_rows))
        if stopped == "interrupted":
            self.echo(f"stopped at step {self.step}; the state is saved in {self.store.folder}; continue with "
                      "--resume")
        elif final is not None:
            self.echo(f"saved {final} (step {best})")
        return TrainResult(out=self.out, step=self.step, stopped=stopped, final=final, best_step=best,
                           rows=list(getattr(self, "_summary_rows", [])), losses=list(self.losses), message=message,
                           signal=self._signal)

    def _run(self) -> TrainResult:
        state = self._prepare_or_resume()
        cfg = self.config  # _prepare may have completed it (the model's path)
        if self.ranks.is_main:
            cfg.replace(resume=None).write(self.out)
            self.log = RunLog(self.out, total_steps=cfg.total_steps, start_step=self.step, progress=cfg.progress,
                              tensorboard=cfg.tensorboard, echo=self._echo)
        else:
            self.log = SilentLog()
        old_handlers = self._install_signals()
        try:
            assert self.batches is not None  # _prepare made it
            if state is None:
                self.log.event("start", 0, method=self.method.name, images=len(self.dataset),
                               val_images=len(self.val_items), resolution=self.resolution,
                               cached_latents=self.batches.cached)
                if self.val is not None:
                    base = self.ranks.broadcast(self.validation_loss() if self.ranks.is_main else None)
                    self.log.event("baseline", 0, val_loss=base)
                    self.echo(f"validation loss before training: {base:.6f}")
            try:
                stopped = self._train()
            except Diverged as d:
                good = self._rollback()
                message = self._divergence_message(d, good)
                self.log.event("diverged", d.step, what=d.what, rolled_back_to=good)
                result = self._finish("diverged", message)
                raise TrainingDiverged(message, result) from None
            if stopped == "interrupted" and self.step > 0:
                latest = self.store.latest() if self.ranks.is_main else None
                if not self.ranks.broadcast(latest is not None and latest.name.startswith(f"step-{self.step:06d}-")):
                    self._save_state()
                self.log.event("interrupted", self.step, signal=self._signal)
            return self._finish(stopped)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.log.close()
            self.method.teardown()


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """Run one training (see `Trainer` for the keyword arguments)."""
    return Trainer(config, **kwargs).run()
