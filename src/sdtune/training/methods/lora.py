"""`lora`: a LoRA trained with peft on the UNet (attention by default; optionally feed-forward and ResNet conv
layers) and optionally the text encoder(s), with its own learning rate.

rank and alpha are explicit: the update is B @ A * alpha / rank; the effective scale alpha/rank is printed at the
start and stored in the file's metadata (`sdtune_lora_scale`, next to kohya's ss_network_dim/ss_network_alpha).

Targets (`--target`, repeatable): the presets `attn` (to_q, to_k, to_v, to_out.0), `ff` (ff.net.0.proj, ff.net.2),
`conv` (ResNet conv1, conv2, conv_shortcut: LoCon-style), `proj` (proj_in, proj_out), or UNet module names (suffixes).
`--text-encoder` adds LoRAs to the text encoder(s) (q/k/v/out_proj, fc1, fc2), trained at `--text-encoder-lr`
(default: the run's --lr); their kohya keys are lora_te_ (SD1/SD2) or lora_te1_/lora_te2_ (SDXL).

Files are written by `sdtune.adapters.lora.save_lora` (kohya layout by default, or diffusers/PEFT) and every saved
file is reloaded through diffusers and compared with the trained deltas (`verify_lora_file`); a file that fails
stops the run with the reason.

Shared with DreamBooth (`training.prior`): `--prompt` with per-image captions, prior preservation.

`--pivotal` (pivotal tuning, `training.methods.pivotal`): a new word trained as Textual Inversion with the LoRA and
bundled in its file.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.training.options import opt
from sdtune.training.methods.base import Batch, Diverged, TrainingMethod, UNetConditioning, trainable
from sdtune.training.methods.pivotal import PivotalOptions, PivotalWord, check_pivotal_options
from sdtune.training.methods.text_encoders import (
    TEXT_ENCODERS,
    check_text_encoder_lr,
    text_encoder_group,
    text_encoders_of,
)
from sdtune.training.prior import PersonalizeMixin, PersonalizeOptions, check_personalize_options

if TYPE_CHECKING:
    from sdtune.generate.generator import Generator
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig
    from sdtune.training.context import TrainingContext

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PRESETS = {"attn": list(DEFAULT_TARGETS), "ff": ["ff.net.0.proj", "ff.net.2"],
           "conv": ["conv1", "conv2", "conv_shortcut"], "proj": ["proj_in", "proj_out"]}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ADAPTER = "sdtune"


@dataclass
class LoraOptions(PersonalizeOptions, PivotalOptions):
    rank: int = opt(4, "LoRA rank (dimension).", section="lora", kind="int")
    alpha: float | None = opt(None, "LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank).",
                              section="lora", kind="float")
    dropout: float = opt(0.0, "Dropout on the LoRA input.", section="lora", kind="float")
    targets: list[str] = opt(list(DEFAULT_TARGETS), "UNet layers that get a LoRA: presets attn, ff, conv, proj, or "
                             "module names (suffixes); repeat the option.", section="lora", kind="strs",
                             metavar="NAME")
    text_encoder: bool = opt(False, "Also train LoRAs on the text encoder(s).", section="lora", kind="bool")
    text_encoder_lr: float | None = opt(None, "Learning rate of the text-encoder LoRAs (default: --lr; it follows "
                                        "the same schedule).", section="lora", kind="float")
    format: str = opt("kohya", "File layout: kohya (A1111, ComfyUI, kohya and diffusers load it) or diffusers "
                      "(PEFT keys: diffusers only; A1111 and kohya map none of its keys and ComfyUI ignores its "
                      "attention keys and its alpha; `sdtune convert FILE --to kohya` makes a kohya file of it).",
                      section="lora", kind="str", choices=("kohya", "diffusers"))


def expand_targets(targets: list[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        for name in PRESETS.get(t, [t]):
            if name not in out:
                out.append(name)
    return out


def _matching(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Linear | torch.nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and any(n == t or n.endswith("." + t) for t in targets)}


def layer_dim(module: torch.nn.Linear | torch.nn.Conv2d) -> int:
    """The largest rank a LoRA on this layer can have: min(fan-in, fan-out)."""
    w = module.weight
    fan_in = int(w[0].numel())
    return min(fan_in, int(w.shape[0]))


def check_rank(rank: int, layers: Mapping[str, torch.nn.Linear | torch.nn.Conv2d], where: str) -> None:
    small = sorted(((layer_dim(m), n) for n, m in layers.items() if layer_dim(m) < rank))
    if small:
        dim, name = small[0]
        raise SdtuneError(f"lora rank {rank} is larger than {len(small)} {where} layer(s)' dimension (smallest: "
                          f"{name}, {dim}); a LoRA's rank cannot exceed min(in, out) of its layer: use --rank {dim} "
                          "or less, or target other layers")


class LoraMethod(PersonalizeMixin, TrainingMethod):
    name = "lora"
    summary = "LoRA on the UNet (attention by default; ff/conv optional) and optionally the text encoder(s)."
    Options = LoraOptions
    # off by default: measured on the toy world, automatic prior preservation kept the base model (99%) but the
    # README's command then learnt the concept in 6% of bare-identifier images instead of 81% (docs/lora.md)
    prior_default = False
    pivotal: PivotalWord | None = None  # --pivotal: the new word (set by `setup`)
    _te_trained = False

    @classmethod
    def check_options(cls, options: Any, config: TrainConfig) -> None:
        if options.rank < 1:
            raise SdtuneError(f"lora rank {options.rank} must be at least 1 (4-32 is typical)")
        if options.alpha is not None and not options.alpha > 0:
            raise SdtuneError(f"lora alpha {options.alpha:g} must be > 0: alpha 0 makes the LoRA's update zero, so "
                              "nothing would be learned (default: alpha = rank; rank/2 or 1 are common)")
        if not 0 <= options.dropout < 1:
            raise SdtuneError(f"lora dropout {options.dropout} must be in [0, 1)")
        if not options.targets:
            raise SdtuneError("lora targets is empty; use e.g. attn (to_q to_k to_v to_out.0), ff, conv")
        check_text_encoder_lr(options.text_encoder_lr, options.text_encoder, "--text-encoder")
        check_personalize_options(options, cls.name, cls.prior_default, config.resolution)
        check_pivotal_options(options, config)

    @property
    def alpha(self) -> float:
        return float(self.options.alpha if self.options.alpha is not None else self.options.rank)

    @property
    def scale(self) -> float:
        return self.alpha / self.options.rank

    def text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        assert self.model is not None
        if not self.options.text_encoder:
            return []
        return text_encoders_of(self.model.pipe)

    def setup(self, model: LoadedModel, config: TrainConfig) -> list[dict[str, Any]]:
        from peft import LoraConfig, inject_adapter_in_model

        self.model, self.config = model, config
        unet = model.pipe.unet
        targets = expand_targets(list(self.options.targets))
        names = {n for n, _ in unet.named_modules()}
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise SdtuneError(f"lora targets {', '.join(missing)} match no UNet module; use the presets "
                              f"{', '.join(PRESETS)} or names such as {', '.join(DEFAULT_TARGETS)}")
        check_rank(self.options.rank, _matching(unet, targets), "UNet")
        for _, te in self.text_encoders():
            check_rank(self.options.rank, _matching(te, TEXT_TARGETS), "text-encoder")
        # peft annotates lora_alpha as int, but only ever computes lora_alpha / r with it: a float alpha is fine
        unet.add_adapter(LoraConfig(r=self.options.rank, lora_alpha=self.alpha,  # type: ignore[arg-type]
                                    lora_dropout=self.options.dropout,
                                    target_modules=targets, init_lora_weights=True), adapter_name=ADAPTER)
        groups: list[dict[str, Any]] = [{"params": trainable(unet.parameters())}]
        te_params: list[torch.nn.Parameter] = []
        for _, te in self.text_encoders():
            # peft's own API, not transformers' `add_adapter` integration: that layer demands its own peft versions
            inject_adapter_in_model(LoraConfig(r=self.options.rank,
                                               lora_alpha=self.alpha,  # type: ignore[arg-type]  # float: see above
                                               lora_dropout=self.options.dropout, target_modules=list(TEXT_TARGETS),
                                               init_lora_weights=True), te, adapter_name=ADAPTER)
            te_params += trainable(te.parameters())
        self._te_trained = bool(te_params)
        self.trains_text_encoder = bool(te_params)
        if te_params:
            groups.append(text_encoder_group(te_params, config, self.options.text_encoder_lr))
        self.pivotal = PivotalWord(self.options) if self.options.pivotal else None
        if self.pivotal is not None:
            groups.append(self.pivotal.setup(model, config))
            self.trains_text_encoder = True
        self._targets = targets
        return groups

    def prepare_data(self, ctx: TrainingContext) -> None:
        te = f"; text encoder(s) too, lr {self.options.text_encoder_lr or 'as --lr'}" if self.options.text_encoder \
            else ""
        ctx.echo(f"LoRA rank {self.options.rank}, alpha {self.alpha:g}: effective scale alpha/rank = "
                     f"{self.scale:g}; UNet targets {', '.join(self._targets)}{te}")
        self.personalize_prepare(ctx)
        if self.pivotal is not None:
            self.pivotal.prepare(ctx)
            if self.keep_base is not None:  # the captions now name the concept with the new word
                self.keep_base.identifier = self.pivotal.token
                ctx.echo(f"keep-base: the captions without {self.pivotal.token} (the new word) are the ones kept")

    # -- pivotal tuning: the word's vectors in the text conditioning ------------------------------------------

    def conditioning(self, batch: Batch) -> UNetConditioning:
        if self.pivotal is not None:  # text encodings are cached again once the word stops training
            self._step = batch.step
            self.trains_text_encoder = self._te_trained or self.pivotal.trains_at(batch.step)
        return super().conditioning(batch)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pivotal is None:
            return super()._encode(captions)
        return self.pivotal.encode(captions, getattr(self, "_step", 0))

    @contextlib.contextmanager
    def apply_for_sampling(self, generator: Generator) -> Iterator[Generator]:
        with super().apply_for_sampling(generator) as g:
            if self.pivotal is None:
                yield g
                return
            with self.pivotal.apply_for_sampling(g):
                yield g

    def finalize(self, final: Path, source: Path, ctx: TrainingContext) -> None:
        if self.pivotal is not None:
            self.pivotal.write_embedding(final, ctx.out, ctx)  # final: a link or copy of the best checkpoint

    def modules(self) -> list[torch.nn.Module]:
        assert self.model is not None
        return [self.model.pipe.unet] + [te for _, te in self.text_encoders()]

    @contextlib.contextmanager
    def base_weights(self) -> Iterator[None]:
        """The LoRA layers switched off (peft's flag, read at every forward; requires_grad untouched)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for _, part in self._parts() for m in part.modules() if isinstance(m, BaseTunerLayer)]
        before = [m._disable_adapters for m in layers]
        for m in layers:
            m._disable_adapters = True
        try:
            yield
        finally:
            for m, was in zip(layers, before):
                m._disable_adapters = was

    def _parts(self) -> list[tuple[str, torch.nn.Module]]:
        assert self.model is not None
        return [("unet", self.model.pipe.unet)] + self.text_encoders()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = self._lora_state_dict()
        if self.pivotal is not None:
            out.update(self.pivotal.state_dict())
        return out

    def _lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        out: dict[str, torch.Tensor] = {}
        for prefix, model in self._parts():
            sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
            # the UNet's keys stay unprefixed (states saved before text-encoder training existed still load)
            out.update({(k if prefix == "unet" else f"{prefix}.{k}"): v.detach() for k, v in sd.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        from sdtune.training.methods.pivotal import STATE_PREFIX

        if self.pivotal is not None:
            self.pivotal.load_state_dict({k: v for k, v in state.items() if k.startswith(STATE_PREFIX)})
        state = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
        expected = self._lora_state_dict()
        if set(state) != set(expected):
            raise SdtuneError(f"saved LoRA weights do not match this LoRA ({len(state)} tensors saved, "
                              f"{len(expected)} expected); were rank, targets, text_encoder or the model's family "
                              "changed?")
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
        if bad:
            raise SdtuneError(f"saved LoRA weights have other shapes than this LoRA ({bad[0]}: "
                              f"{list(state[bad[0]].shape)} vs {list(expected[bad[0]].shape)}); was the rank or the "
                              "model changed?")
        for prefix, model in self._parts():
            if prefix == "unet":
                part = {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODERS)}
            else:
                part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            set_peft_model_state_dict(model, dict(part), adapter_name=ADAPTER)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {(k if k.startswith(TEXT_ENCODERS) else f"unet.{k}"): v for k, v in self._lora_state_dict().items()}

    def metadata(self) -> dict[str, str]:
        meta = {"sdtune_lora_targets": json.dumps(list(self.options.targets)),
                "sdtune_lora_rank": str(self.options.rank), "sdtune_lora_alpha": f"{self.alpha:g}",
                "sdtune_lora_scale": f"{self.scale:g}",
                "sdtune_lora_text_encoder": str(bool(self.options.text_encoder))}
        if self.pivotal is not None:
            meta.update(self.pivotal.metadata())
        return {**meta, **self.personalize_metadata()}

    def save(self, path: str | Path, step: int, metadata: Mapping[str, str]) -> Path:
        from sdtune.adapters.lora import lora_deltas_from_peft, network_from_peft, save_lora, verify_lora_file

        assert self.model is not None
        meta = {**dict(metadata), **self.metadata(), "sdtune_step": str(step)}
        pipe = self.model.pipe
        deltas = lora_deltas_from_peft(pipe, ADAPTER)
        if not all(bool(torch.isfinite(d).all()) for d in deltas.values()):

            raise Diverged(step, "weights (the LoRA update B @ A overflows)")
        net = network_from_peft(pipe, ADAPTER, family=self.model.family)
        if self.pivotal is not None:  # the word, as A1111 reads embeddings bundled in a LoRA
            net.embeddings = self.pivotal.bundle()
        written = save_lora(net, path, format=self.options.format, metadata=meta)
        try:  # the self-check: the file reloads through diffusers with exactly the trained deltas
            verify_lora_file(written, pipe, deltas)
        except SdtuneError as exc:
            raise SdtuneError(f"the LoRA saved at step {step} failed its self-check, so training stops (the file is "
                              f"kept for inspection: {written}): {exc}") from None
        return written
