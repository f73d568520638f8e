"""The training loop's preparation, beside the loop (`training.loop`): resume checks, device, model selection,
the model, data, the method's setup and the optimizer, each checked before the next and before anything slow.

`TrainerSetup` is a part of `Trainer` (a mixin, as diffusers' loaders are): it holds no state of its own.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from sdtune.errors import SdtuneError
from sdtune.models.bundled import is_bundled_model
from sdtune.training.batches import BatchSource, LatentEncoder, sdxl_time_ids
from sdtune.training.checkpoint import TrainState
from sdtune.training.config_checks import parse_select_by
from sdtune.training.distributed import Ranks, check_launch_engine, launched_as_other_rank
from sdtune.training.ledger import CheckpointLedger
from sdtune.training.methods import get_method
from sdtune.training.context import TrainingContext
from sdtune.training.noise import NoiseModel
from sdtune.training.parts import TrainerParts
from sdtune.training.schedules import LRSchedule, parse_early_stop
from sdtune.training.validation import Selection, ValidationSet


if TYPE_CHECKING:

    from sdtune.training.data import DatasetItem


# Settings that may differ on resume without changing the maths of the steps already taken.
RESUME_FREE = {"steps", "save_every", "keep_checkpoints", "keep_states", "resume", "sample_every", "sample_prompts",
               "sample_seeds", "sample_negative", "sample_steps", "sample_cfg", "sample_sampler", "early_stop",
               "select_by", "progress", "tensorboard", "out", "device", "judge", "judge_term", "judge_seeds",
               "judge_any_model", "compile", "channels_last", "latent_cache",
               "identifier_init"}  # restored with the identifier's vectors


def _make_accelerator(mixed_precision: str, grad_accum: int, cpu: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kwargs = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu)
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        # accelerate keeps one global state per process; a later run in the same process (Python API, tests)
        # with another precision needs it reset. Only safe without distributed processes.
        if "already been initialized" not in str(exc) or AcceleratorState().num_processes != 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


class TrainerSetup(TrainerParts):
    """`Trainer._prepare` and what it needs (see the module docstring)."""

    if TYPE_CHECKING:  # provided by TrainerRecovery
        def _restore(self, state: TrainState, *, rng: bool = True) -> None: ...

    def _prepare_or_resume(self) -> TrainState | None:
        """Prepare the run and restore the saved state when resuming (returned; None for a new run). If either
        fails (e.g. a state that does not match) the method is torn down, so a caller's model is given back as
        it was."""
        state = self._find_resume()
        if not launched_as_other_rank():
            self.store.clean_temp()
        if state is not None:
            self._check_resume_config(state)
        try:
            self._prepare()
            if state is not None:
                if state.extra.get("dataset") not in (None, self.dataset.fingerprint()):
                    self.echo("warning: the training images changed since the state was saved; the data order "
                              "after resuming differs from the original run")
                self._restore(state)
        except BaseException:
            if self._method is not None:  # None: stopped before a method was chosen (nothing to undo)
                self._method.teardown()
            raise
        if state is not None:
            self.echo(f"resuming at step {self.step} from {state.path}")
            if self.step >= self.config.total_steps:
                self.echo(f"note: the run is already at step {self.step}, --steps is {self.config.total_steps}: "
                          "nothing to train; the result is written from the saved state (raise --steps to go on)")
            saved_world = int(state.extra.get("processes", 1))
            if saved_world != self.ranks.world:
                self.echo(f"warning: the state was saved by {saved_world} process(es), this run has "
                          f"{self.ranks.world}: the global batch (batch_size x processes) and the data order change")
        return state

    def _find_resume(self) -> TrainState | None:
        cfg = self.config
        latest = self.store.latest()
        if cfg.resume is None:
            if latest is not None:
                raise SdtuneError(f"{self.out} already holds a training run (state at {latest.name}); pass --resume "
                                  "to continue it, or choose another --out")
            return None
        if cfg.resume == "auto":
            if latest is None:
                self.echo(f"no saved state in {self.store.folder}: starting a new run")
                return None
            return self.store.load(latest)
        return self.store.load(cfg.resume)

    def _check_resume_config(self, state: TrainState) -> None:
        saved = state.config
        if not saved:
            return
        now = self.config.to_dict()
        changed = []
        for sec, values in now.items():
            if isinstance(values, dict):
                old = saved.get(sec, {})
                changed += [k for k, v in values.items() if k not in RESUME_FREE and isinstance(old, dict)
                            and k in old and old[k] != v]
            elif saved.get(sec) != values:
                changed.append(sec)
        if changed:
            self.echo(f"warning: resuming with changed settings ({', '.join(changed)}); the continued run is not "
                      "the run that was saved")
        old_steps = saved.get("optim", {}).get("steps")
        if old_steps not in (None, self.config.steps) and self.config.lr_scheduler != "constant":
            self.echo(f"note: the {self.config.lr_scheduler} schedule now spans {self.config.steps} steps "
                      f"(was {old_steps})")

    def _prepare(self) -> None:
        """Everything before the first step, each stage checked before the next (and before anything slow)."""
        self._prepare_device()
        self._prepare_selection()
        multiple = self._prepare_model()
        self._prepare_data(multiple)
        groups = self._prepare_method()
        self._prepare_optimizer(groups)
        cfg = self.config
        self.noise = NoiseModel(self.model.pipe.scheduler.config, self.model.prediction_type,
                                noise_offset=cfg.noise_offset, min_snr_gamma=cfg.min_snr_gamma)
        # batch_size is per process: the global batch is batch_size x processes (x grad_accum per optimizer step)
        self.batches = BatchSource(self.dataset, self.aug, self.encoder, seed=cfg.seed,
                                   batch_size=cfg.batch_size * self.ranks.world, buckets=cfg.buckets, crop=cfg.crop,
                                   sample_latents=self.latents_mode == "sample", is_sdxl=self.is_sdxl,
                                   device=self.device, ranks=self.ranks, disk=self._latent_folder())
        self.batches.encode_cache(self.echo)
        self.val = self._build_validation()
        if (cfg.val_split > 0 or cfg.val_dir is not None or cfg.cv_fold is not None) and self.val is None:
            raise SdtuneError("the validation set is empty")

    def _latent_folder(self) -> Path | None:
        """--latent-cache disk: OUT/latent_cache/<key of the items, flips and model> (`latents.DiskLatents`)."""
        from sdtune.training.latents import disk_cache_key

        if self.config.latent_cache != "disk":
            return None
        key = disk_cache_key(self.dataset.items, self.aug.flip_p > 0, str(self.model.hash), self.resolution)
        return self.out / "latent_cache" / key

    def _precheck(self) -> None:
        """What can be refused without the model, before the run takes its output folder (the state lock): the
        device, and data folders that hold no images or images this process cannot read (listed and opened, not
        decoded)."""
        from sdtune.paths import check_readable
        from sdtune.training.data import list_images

        self._check_device()
        cfg = self.config
        for folder in (cfg.data, cfg.val_dir):
            if folder is not None:
                for path, _, _ in list_images(folder)[1].images:
                    check_readable(path, str(path))

    def _check_device(self) -> Any:
        from sdtune.models.device import resolve_device_dtype

        cfg = self.config
        dev, _ = resolve_device_dtype(cfg.device, None)
        if cfg.mixed_precision == "fp16" and dev.type != "cuda":
            raise SdtuneError("fp16 mixed precision needs a CUDA GPU; use --mixed-precision bf16 or no")
        return dev

    def _prepare_device(self) -> None:
        cfg = self.config
        dev = self._check_device()
        check_launch_engine()  # DeepSpeed/FSDP from `accelerate launch` would be silently ignored
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1  # several processes: each takes its LOCAL_RANK GPU
        if dev.type == "cuda" and dev.index is not None and not launched:
            torch.cuda.set_device(dev.index)
        self.accelerator = _make_accelerator(cfg.mixed_precision, cfg.grad_accum, cpu=dev.type == "cpu")
        self.device = self.accelerator.device
        self.ranks = Ranks.from_accelerator(self.accelerator)

    def _prepare_selection(self) -> None:
        """The method object and how checkpoints are selected (checked before the model loads)."""
        cfg = self.config
        if self._method is None:
            self._method = get_method(cfg.method)(cfg.options)
        if cfg.judge and self.evaluator is None:  # the toy world stays out of the training core
            raise SdtuneError(f"judge {cfg.judge!r} is the toy world's evaluator: pass "
                              "evaluator=sdtune.toy.concept_eval.evaluator_for(config) to train() (the CLI does)")
        select_metric, select_mode = parse_select_by(cfg.select_by)
        early = parse_early_stop(cfg.early_stop)
        has_val = cfg.val_split > 0 or cfg.val_dir is not None or cfg.cv_fold is not None
        if early and select_metric == "val_loss" and not has_val:
            raise SdtuneError("early_stop needs a validation set (--val-split or --val-dir), or an evaluator metric "
                              "named with --select-by")
        if select_metric != "val_loss" and self.evaluator is None:
            raise SdtuneError(f"select_by {select_metric!r} needs an evaluator that reports it; use val_loss")
        self.ledger = CheckpointLedger(cfg.out_dir, Selection(select_metric, select_mode, *(early or (None, 0.0))),
                                       selecting=(select_metric != "val_loss") or has_val,
                                       keep=cfg.keep_checkpoints, average=cfg.average_checkpoints,
                                       writes=self.ranks.is_main)

    def _prepare_model(self) -> int:
        """Load and check the model; returns the multiple every training resolution must be."""
        cfg = self.config
        if self.model is None:
            from sdtune.models import load_model

            dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[cfg.mixed_precision]
            self.model = load_model(cfg.model, vae=cfg.vae, device=str(self.device), dtype=dtype,
                                    prediction_type=cfg.prediction_type)
        model = self.model
        if self._given_model and not is_bundled_model(model.name) and str(model.source) not in ("", ".") \
                and Path(model.source).exists():
            self.config = cfg = cfg.replace(model=str(model.source))  # the config written names the real model
        if model.family == "sdxl-refiner":
            raise SdtuneError(f"{model.name} is an SDXL refiner; train on an SDXL base model")
        pipe = model.pipe
        self.unet = pipe.unet
        self.is_sdxl = model.family == "sdxl"
        vae_factor = int(pipe.vae_scale_factor)
        multiple = vae_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        size = self.unet.config.sample_size
        native = (size if isinstance(size, int) else size[0]) * vae_factor
        self.resolution = cfg.resolution or native
        if self.resolution % multiple:
            raise SdtuneError(f"resolution {self.resolution} does not fit {model.name}: use a multiple of {multiple} "
                              f"(native {native})")
        return multiple

    def _prepare_data(self, multiple: int) -> None:
        from sdtune.training.examples import Augment
        from sdtune.training.latents import resolve_latents_mode

        cfg, model, pipe = self.config, self.model, self.model.pipe

        self._load_data(multiple)  # first: bad images are the likeliest failure, and it ends in one line
        self.latents_mode = resolve_latents_mode(cfg.latents, model)
        if cfg.latents == "auto" and self.latents_mode == "mean":
            self.echo(f"latents: posterior means ({model.name} was trained on them)")
        self.encoder = LatentEncoder(pipe.vae, upcast_fp16=self.is_sdxl, store=self.latent_store,
                                     model_key=f"{model.hash}:{self.resolution}:{cfg.vae}")
        self.aug = Augment(crop=cfg.crop, zoom=(1.0, cfg.zoom), flip_p=cfg.flip, shuffle=cfg.shuffle_tags,
                           keep_first=cfg.keep_tokens, tag_dropout=cfg.tag_dropout, caption_dropout=cfg.caption_dropout)

    def _prepare_method(self) -> list[dict[str, Any]]:
        """Everything frozen, then the method unfreezes its weights; returns its optimizer param groups."""
        cfg, model, pipe = self.config, self.model, self.model.pipe
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self._seed_all(cfg.seed)
        groups = self.method.setup(model, cfg)
        with self.ranks.main_first():  # class images: generated once (main process), reused by the others
            self.method.prepare_data(self.context())  # e.g. LoRA/DreamBooth: --prompt captions, class images
        self.params = [p for g in groups for p in g["params"]]
        if not self.params or not all(p.requires_grad for p in self.params):
            raise SdtuneError(f"method {self.method.name!r} returned no trainable parameters")
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.method.trains_text_encoder:
                for name in ("text_encoder", "text_encoder_2"):
                    te = getattr(pipe, name, None)
                    if te is not None and hasattr(te, "gradient_checkpointing_enable"):
                        te.gradient_checkpointing_enable()
        if cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if cfg.compile:  # only the training step's calls: samples and the saved files use the plain module
            self.unet = torch.compile(self.unet)
        for module in self.method.modules():
            module.train()
        self._initial = {k: v.detach().to("cpu", copy=True) for k, v in self.method.state_dict().items()}
        return groups

    def _prepare_optimizer(self, groups: list[dict[str, Any]]) -> None:
        cfg = self.config
        self.schedule = LRSchedule.from_config(cfg.lr, cfg.lr_scheduler, cfg.warmup_steps, cfg.total_steps)
        opt_groups = []
        for g in groups:
            g = dict(g)
            g.setdefault("lr_scale", 1.0)
            g["lr"] = self.schedule(1) * g["lr_scale"]
            opt_groups.append(g)
        if cfg.optimizer in ("adamw8bit", "prodigy"):  # optional packages (training.optimizers)
            from sdtune.training.optimizers import make_optimizer

            opt = make_optimizer(cfg.optimizer, opt_groups, lr=self.schedule(1), weight_decay=cfg.weight_decay)
        elif cfg.optimizer in ("adamw", "adamw_fused"):
            opt = torch.optim.AdamW(opt_groups, lr=self.schedule(1), weight_decay=cfg.weight_decay,
                                    fused=cfg.optimizer == "adamw_fused" or None)
        else:
            opt = torch.optim.SGD(opt_groups, lr=self.schedule(1), momentum=0.9, weight_decay=cfg.weight_decay)
        self.optimizer = self.accelerator.prepare(opt)

    def context(self) -> TrainingContext:
        """What the method may use of this run (`training.context`)."""
        return TrainingContext(config=self.config, model=self.model, out=self.out, device=self.device,
                               resolution=self.resolution, is_sdxl=self.is_sdxl, latents_mode=self.latents_mode,
                               echo=self.echo, encode_images=self.encoder.encode,
                               generate_images=self.generate_images, map_captions=self._map_captions)

    def _map_captions(self, caption_of: Callable[[DatasetItem], str]) -> None:
        import dataclasses

        self.dataset.items = [dataclasses.replace(it, caption=caption_of(it)) for it in self.dataset.items]
        self.val_items = [dataclasses.replace(it, caption=caption_of(it)) for it in self.val_items]

    def _seed_all(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _load_data(self, multiple: int) -> None:
        from sdtune.training.data import Dataset, scan_dataset

        cfg = self.config
        assert cfg.data is not None  # check_paths (in run) requires it
        step = math.lcm(64, multiple) if self.resolution >= 256 else multiple

        def scan(folder: str | Path) -> Dataset:
            return scan_dataset(folder, resolution=self.resolution, buckets=cfg.buckets, bucket_step=step,
                                skip_bad=cfg.skip_bad)

        ds = scan(cfg.data)
        for w in ds.warnings:
            self.echo(f"warning: {w}")
        items = list(ds.items)
        val_items: list[DatasetItem] = []
        if cfg.val_split > 0:
            order = list(range(len(items)))
            random.Random(f"{cfg.seed}:validation").shuffle(order)
            n_val = max(1, round(len(items) * cfg.val_split))
            if n_val >= len(items):
                raise SdtuneError(f"val_split {cfg.val_split} leaves no training images out of {len(items)}; use a "
                                  "smaller split or add images")
            held = set(order[:n_val])
            val_items = [it for i, it in enumerate(items) if i in held]
            items = [it for i, it in enumerate(items) if i not in held]
        elif cfg.cv_fold is not None:  # a cross-validation fold run (`training.crossval`): hold out its fold
            from sdtune.training.folds import fold_of

            folds = fold_of(items, cfg.cv_folds, cfg.seed)
            val_items = [it for it, f in zip(items, folds) if f == cfg.cv_fold]
            items = [it for it, f in zip(items, folds) if f != cfg.cv_fold]
        elif cfg.val_dir is not None:
            vds = scan(cfg.val_dir)
            val_items = list(vds.items)
        self.dataset = Dataset(folder=ds.folder, resolution=ds.resolution, items=items, warnings=ds.warnings,
                               skipped=ds.skipped)
        self.val_items = val_items

    # -- latents -------------------------------------------------------------------------------------------

    def _build_validation(self) -> ValidationSet | None:
        if not self.val_items:
            return None
        cached = self.encoder.encode(list(self.val_items))
        ids = [sdxl_time_ids(it, "center") if self.is_sdxl else None for it in self.val_items]
        return ValidationSet.build([c.mean for c in cached], [it.caption for it in self.val_items], ids,
                                   n_timesteps=self.config.val_timesteps, seed=self.config.seed,
                                   num_train_timesteps=self.noise.num_timesteps)
