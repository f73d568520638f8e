"""`TrainingMethod`: what a personalisation method (LoRA, Textual Inversion, DreamBooth, hypernetwork) adds to the
one training loop in `training.loop`.

The loop owns data, noise, timesteps, the optimizer, schedules, checkpoints, validation and logging. A method
says which weights train (`setup`), how captions become UNet conditioning (`conditioning`; the default runs the
pipeline's own `encode_prompt` and caches the result per caption unless `encodes_live` says it depends on
trained weights), an optional
extra loss (`extra_loss`, e.g. prior preservation), how its weights are read and written (`state_dict`,
`load_state_dict`, `save`) and how the live weights are used for sample images (`apply_for_sampling`).

The contract, in the order the loop calls it: `check_options` (before anything loads), `setup(model, config)`,
`prepare_data(ctx)`, then per step `conditioning` / `extra_loss` / `after_optimizer_step`, `state_dict` /
`load_state_dict` / `save` at checkpoints, `finalize(final, source, ctx)` once the final file exists, and
`teardown()` however the run ends. Methods see the run only through the `TrainingContext` (`training.context`);
a hook that finds the weights non-finite raises `Diverged`, and the loop rolls back.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping

import torch

from sdtune.training.options import NoOptions

if TYPE_CHECKING:
    from sdtune.generate.generator import Generator
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig
    from sdtune.training.context import TrainingContext


class Diverged(Exception):
    """Raised inside a step or a checkpoint when the loss, gradients or weights are no longer finite: the loop
    rolls back to the last good state (nothing non-finite is written) and stops with `TrainingDiverged`."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(what)
        self.step, self.what = step, what


@dataclass
class UNetConditioning:
    """UNet conditioning for one batch. added_cond_kwargs holds SDXL's text_embeds and time_ids."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def unet_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = self.added_cond_kwargs
        return kw


@dataclass
class Batch:
    """One micro-batch as the loop hands it to a method."""

    latents: torch.Tensor                 # (B, C, h, w) float32 on the training device, already scaled
    captions: list[str]                   # after caption augmentation
    indices: list[int] = field(default_factory=list)    # dataset item indices
    flipped: list[bool] = field(default_factory=list)
    time_ids: torch.Tensor | None = None  # SDXL (B, 6): original size, crop top-left, target size (h, w order)
    step: int = 0                         # the optimizer step this batch belongs to (1-based)
    # Several processes (`training.distributed`): this micro-batch is rows [offset, offset + B) of a global batch of
    # `total` (0: the whole batch), and `share` its part of the global loss (0 for a rank with nothing to train on).
    offset: int = 0
    total: int = 0
    share: float = 1.0


TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents, timesteps) -> target
# diffusion_loss(latents, cond, target=None): the loop's loss with this step's noise; `target` replaces the
# noise target with another prediction (e.g. the base model's, to keep some behaviour unchanged)
DiffusionLoss = Callable[..., torch.Tensor]


class TrainingMethod:
    """Base class of a training method. Subclasses set `name`, optionally an `Options` dataclass (fields declared
    with `training.config.opt(..., section=<name>)`), and implement `setup`, `state_dict`, `load_state_dict`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    file_ext: str = ".safetensors"                # a method may choose it per instance (from its options)
    public: ClassVar[bool] = True                 # False: Python API only, no `sdtune train <name>` command
    text_cache_size: ClassVar[int] = 4096

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        # False: text-encoder outputs are computed once per caption and cached; `setup` sets it when it trains one
        self.trains_text_encoder = False
        self.model: LoadedModel | None = None
        self.config: TrainConfig | None = None
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    # -- configuration -------------------------------------------------------------------------------------

    @classmethod
    def check_options(cls, options: Any, config: TrainConfig) -> None:
        """Raise a one-line SdtuneError for bad method settings (called before anything is loaded)."""

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self, model: LoadedModel, config: TrainConfig) -> list[dict[str, Any]]:
        """Make the method's weights trainable (everything is frozen when this is called) and return optimizer
        param groups: [{"params": [...], "lr_scale": 1.0, "weight_decay": ...}] ("lr_scale" multiplies the run's
        learning rate; other keys go to the optimizer). Store `model`/`config` on self."""
        raise NotImplementedError

    def prepare_data(self, ctx: TrainingContext) -> None:
        """After `setup`, before the training latents are encoded: adjust captions (`ctx.map_captions`), build
        extra data such as prior-preservation class images, report settings with `ctx.echo`."""

    def finalize(self, final: Path, source: Path, ctx: TrainingContext) -> None:
        """After the run's final file `final` was written (a link or copy of the best checkpoint `source`): extra
        outputs such as DreamBooth's diffusers folder."""

    def modules(self) -> list[torch.nn.Module]:
        """Modules holding trained weights: put in train mode while training, eval mode for sampling."""
        assert self.model is not None
        return [self.model.pipe.unet]

    # -- the step ------------------------------------------------------------------------------------------

    def conditioning(self, batch: Batch) -> UNetConditioning:
        """Captions -> UNet conditioning (with SDXL's pooled embeddings and time ids)."""
        hidden, pooled = self.encode_text(batch.captions)
        added = None
        if pooled is not None:
            if batch.time_ids is None:
                raise ValueError("an SDXL batch needs time_ids")
            added = {"text_embeds": pooled, "time_ids": batch.time_ids.to(pooled.device, pooled.dtype)}
        return UNetConditioning(hidden, added)

    def encodes_live(self, caption: str) -> bool:
        """Whether `caption`'s encoding depends on trained weights, so it is encoded every step (with gradients)
        instead of once: every caption while a text encoder trains; a method may name fewer (DreamBooth: the
        captions that read its trained identifier row)."""
        return self.trains_text_encoder

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled or None) with the pipeline's `encode_prompt`, so training sees exactly what
        generation feeds the UNet. Captions that are not `encodes_live` are encoded once and cached."""
        live = [self.encodes_live(c) for c in captions]
        if all(live):
            return self._encode(captions)
        missing = list(dict.fromkeys(c for c, on in zip(captions, live) if not on and c not in self._text_cache))
        if missing:
            with torch.no_grad():
                hidden, pooled = self._encode(missing)
            for i, c in enumerate(missing):
                self._text_cache[c] = (hidden[i].detach(), None if pooled is None else pooled[i].detach())
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        fresh: Iterator[tuple[torch.Tensor, torch.Tensor | None]] = iter(())
        if any(live):
            hidden, pooled = self._encode([c for c, on in zip(captions, live) if on])
            fresh = iter([(h, None if pooled is None else pooled[i]) for i, h in enumerate(hidden)])
        parts = [next(fresh) if on else self._text_cache[c] for c, on in zip(captions, live)]
        hidden = torch.stack([h for h, _ in parts])
        pooled = None if parts[0][1] is None else torch.stack([p for _, p in parts])  # type: ignore[misc]
        return hidden, pooled

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self.model is not None and self.config is not None
        pipe = self.model.pipe
        skip = self.config.clip_skip
        out = pipe.encode_prompt(captions, device=self.model.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False, clip_skip=skip - 1 if skip > 1 else None)
        if len(out) == 4:  # SDXL: (embeds, negative, pooled, negative pooled)
            return out[0], out[2]
        return out[0], None

    def extra_loss(self, batch: Batch, diffusion_loss: DiffusionLoss) -> torch.Tensor | None:
        """An extra term added to the step's loss (e.g. prior preservation). `diffusion_loss(latents, cond,
        target=None)` is the loop's noise-prediction loss with this step's noise generator (see `DiffusionLoss`)."""
        return None

    def teardown(self) -> None:
        """Called once when the run ends, however it ends: undo changes to the live model that only training
        needs (e.g. the hypernetwork's attention processors), so the caller's model generates as before."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. Textual Inversion restores the embedding rows it does not
        train)."""

    # -- weights -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights (CPU or device tensors), enough to restore them with `load_state_dict`."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the method's output file (default: `state_dict`)."""
        return self.state_dict()

    def metadata(self) -> dict[str, str]:
        """Method-specific safetensors metadata (string values) for the output file."""
        return {}

    def save(self, path: str | Path, step: int, metadata: Mapping[str, str]) -> Path:
        """Write the method's file format atomically; returns the path written."""
        from sdtune.formats.safe_io import save_safetensors_atomic

        meta = {**dict(metadata), **self.metadata(), "sdtune_step": str(step)}
        return save_safetensors_atomic(self.file_tensors(), path, meta)

    # -- sampling ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def apply_for_sampling(self, generator: Generator) -> Iterator[Generator]:
        """Make `generator` (a `sdtune.generate.Generator` over the live model) use the current weights. The
        default suits methods that train the live modules in place: eval mode while sampling."""
        mods = self.modules()
        modes = [m.training for m in mods]
        for m in mods:
            m.eval()
        try:
            yield generator
        finally:
            for m, was in zip(mods, modes):
                m.train(was)


def same_layout(state: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> bool:
    """Whether a saved state has exactly the keys and shapes of `want` (the method's own state_dict)."""
    return set(state) == set(want) and all(state[k].shape == want[k].shape for k in state)


def copy_saved(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Each parameter `name` takes the saved tensor `prefix + name` (on its own device and dtype)."""
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[prefix + k].to(p.device, p.dtype))


def trainable(params: Any) -> list[torch.nn.Parameter]:
    """The parameters that require grad, made float32 (trained weights stay fp32 under mixed precision)."""
    out = []
    for p in params:
        if p.requires_grad:
            if p.dtype != torch.float32:
                p.data = p.data.float()
            out.append(p)
    return out
