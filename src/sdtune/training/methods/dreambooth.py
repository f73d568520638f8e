"""`dreambooth`: a full fine-tune of the UNet (the text encoder(s) optionally, with their own learning rate), with
prior preservation on by default (`training.prior`: `--class-prompt`, generated or supplied class images,
`--prior-weight`; turn it off with `--no-prior-preservation`).

Every checkpoint is written as
  * a single-file .safetensors checkpoint in the original (LDM) layout that A1111/ComfyUI load
    (`formats.checkpoint.save_single_file`, atomic), and
  * a diffusers folder next to it (written to a temporary folder, then renamed into place).
The final result is OUT/<name>.safetensors plus the diffusers folder OUT/<name>/ (of the best checkpoint).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.training.options import opt
from sdtune.training.methods.base import TrainingMethod, trainable
from sdtune.training.methods.identifier_rows import DEFAULT_LR as IDENTIFIER_LR
from sdtune.training.methods.identifier_rows import STATE_PREFIX as IDENTIFIER_STATE
from sdtune.training.methods.identifier_rows import IdentifierRows
from sdtune.training.methods.text_encoders import check_text_encoder_lr, text_encoder_group, text_encoders_of
from sdtune.training.prior import PersonalizeMixin, PersonalizeOptions, check_personalize_options

if TYPE_CHECKING:
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig
    from sdtune.training.context import TrainingContext

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REAL_UNET_PARAMS = 100_000_000  # SD1.x's UNet has 860M, SDXL's 2.6G; the bundled tiny model's is a few million
REAL_MAX_LR = 2e-5  # above this a real UNet's full fine-tune is warned about


@dataclass
class DreamBoothOptions(PersonalizeOptions):
    train_text_encoder: bool = opt(False, "Also fine-tune the text encoder(s).", section="dreambooth", kind="bool")
    text_encoder_lr: float | None = opt(None, "Learning rate of the text encoder(s) (default: --lr).",
                                        section="dreambooth", kind="float")
    save_precision: str = opt("fp16", "Precision of the saved checkpoint files.", section="dreambooth", kind="str",
                              choices=tuple(PRECISIONS))
    diffusers_folder: bool = opt(True, "Also write a diffusers folder next to every checkpoint file.",
                                 section="dreambooth", kind="bool")
    train_identifier: bool | None = opt(None, "Also learn the identifier's own embedding (its row of the text "
                                        "encoder's token table, saved in the checkpoint): prompts with it get a "
                                        "word that means the concept, prompts without it do not read that row. "
                                        "Default: on when the identifier is one token (sks is).",
                                        section="dreambooth", kind="bool")
    identifier_init: str | None = opt(None, "Word whose embedding the identifier's trained one starts from (one "
                                      "token). Default: the word after the identifier in most captions, its class "
                                      "(shape in 'a red sks shape'); the identifier itself: its own.",
                                      section="dreambooth", kind="str", metavar="WORD")
    identifier_lr: float | None = opt(None, f"Learning rate of the identifier's embedding (default "
                                      f"{IDENTIFIER_LR:g}; it follows the run's schedule).", section="dreambooth",
                                      kind="float")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temporary folder to `dest`, replacing an older one (rename; the old one is removed after)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{tmp.name}")
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class DreamBoothMethod(PersonalizeMixin, TrainingMethod):
    name = "dreambooth"
    summary = "DreamBooth: full fine-tune of the UNet (text encoder optional) with prior preservation."
    Options = DreamBoothOptions
    prior_default = True
    _base: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None  # --keep-base: (weight, value before training)
    identifier_rows: IdentifierRows | None = None  # --train-identifier (set by `setup`)

    @classmethod
    def check_options(cls, options: Any, config: TrainConfig) -> None:
        check_text_encoder_lr(options.text_encoder_lr, options.train_text_encoder, "--train-text-encoder")
        if options.identifier_lr is not None:
            if not options.identifier_lr > 0:
                raise SdtuneError(f"identifier_lr {options.identifier_lr} must be > 0 (1e-3 to 5e-3 is typical)")
        init = options.identifier_init
        if init is not None and (not init.strip() or any(c.isspace() or c == "," for c in init.strip())):
            raise SdtuneError(f"identifier_init {init!r} must be one word, the class noun (e.g. dog or shape)")
        for name in ("identifier_lr", "identifier_init"):
            if getattr(options, name) is not None and options.train_identifier is False:
                raise SdtuneError(f"{name} is set but --no-train-identifier turns the identifier's training off")
        check_personalize_options(options, cls.name, cls.prior_default, config.resolution)

    def _parts(self) -> list[tuple[str, torch.nn.Module]]:
        assert self.model is not None
        pipe = self.model.pipe
        parts: list[tuple[str, torch.nn.Module]] = [("unet", pipe.unet)]
        if self.options.train_text_encoder:
            parts += text_encoders_of(pipe)
        return parts

    def setup(self, model: LoadedModel, config: TrainConfig) -> list[dict[str, Any]]:
        self.model, self.config = model, config
        groups: list[dict[str, Any]] = []
        te_params: list[torch.nn.Parameter] = []
        for name, module in self._parts():
            module.requires_grad_(True)
            if name == "unet":
                groups.append({"params": trainable(module.parameters())})
            else:
                te_params += trainable(module.parameters())
        self.trains_text_encoder = bool(te_params)
        if te_params:
            groups.append(text_encoder_group(te_params, config, self.options.text_encoder_lr))
        if self.options.train_identifier is not False:
            self.identifier_rows = IdentifierRows(self.options.identifier_lr)
            groups.append(self.identifier_rows.setup(model, config))
        return groups

    def prepare_data(self, ctx: TrainingContext) -> None:
        n = sum(p.numel() for g in self._parts() for p in g[1].parameters())
        ctx.echo(f"DreamBooth: fine-tuning {', '.join(n for n, _ in self._parts())} ({n / 1e6:.1f}M parameters)")
        self._warn_if_rate_is_for_a_toy(ctx)
        if self.options.keep_base:
            self.remember_base()
        init = self._identifier_init()
        if self.identifier_rows is not None and init:
            self.identifier_rows.check_init(init)  # before class images take their time
        self.personalize_prepare(ctx)
        if self.identifier_rows is not None:
            self._start_identifier_rows(ctx)

    def _start_identifier_rows(self, ctx: TrainingContext) -> None:
        """The identifier: the prior's or keep-base's, else --identifier or the one detected in the captions; its
        vectors start from --identifier-init, else from its class noun (the word after it in the captions)."""
        from sdtune.training.identifier import auto_class_prompts, class_noun, read_captions

        assert self.identifier_rows is not None and self.model is not None
        word = next((t.identifier for t in (self.prior, self.keep_base) if t is not None and t.identifier), None)
        if word is None:
            word, _ = auto_class_prompts(ctx, self.options, getattr(self.model.pipe, "tokenizer", None))
        init = self._identifier_init()
        if init is None and word:
            init = class_noun(read_captions(ctx), word)
        self.identifier_rows.start(word, ctx, asked=bool(self.options.train_identifier), init=init,
                                   init_asked=self.options.identifier_init is not None)

    def _identifier_init(self) -> str | None:
        init = self.options.identifier_init
        return init.strip().lower() if init is not None else None

    def encodes_live(self, caption: str) -> bool:
        return super().encodes_live(caption) or (self.identifier_rows is not None and
                                                 self.identifier_rows.reads(caption))

    def _warn_if_rate_is_for_a_toy(self, ctx: TrainingContext) -> None:
        """The default --lr (1e-4) suits the bundled tiny model; a full fine-tune of a real UNet at that rate
        destroys it within a few hundred steps, so say what such runs use before the time is spent."""
        from sdtune.training.schedules import LRSchedule

        assert self.model is not None and self.config is not None
        cfg = self.config
        unet = sum(p.numel() for p in self.model.pipe.unet.parameters())
        peak = LRSchedule.from_config(cfg.lr, cfg.lr_scheduler, cfg.warmup_steps, cfg.total_steps).peak
        if unet > REAL_UNET_PARAMS and peak > REAL_MAX_LR and cfg.optimizer != "prodigy":  # prodigy: --lr 1
            ctx.echo(f"warning: lr {peak:g} is high for a full fine-tune of a {unet / 1e6:.0f}M-parameter UNet "
                     "(DreamBooth on SD1.5/SDXL uses 1e-6 to 5e-6; diffusers' example 5e-6); pass --lr 2e-6 unless "
                     "you mean it")

    def remember_base(self) -> None:
        """Keep a copy of the weights as they are now (before any step), in the model's own precision."""
        assert self.model is not None
        self._base = [(p, p.detach().to(self.model.dtype, copy=True)) for _, m in self._parts()
                      for p in m.parameters()]

    @contextlib.contextmanager
    def base_weights(self) -> Iterator[None]:
        """The weights from before training swapped in (no copy: the tensors' storage is exchanged and put back)."""
        assert self._base is not None, "remember_base() first"
        live = [p.data for p, _ in self._base]
        for p, base in self._base:
            p.data = base
        try:
            yield
        finally:
            for (p, _), data in zip(self._base, live):
                p.data = data

    def modules(self) -> list[torch.nn.Module]:
        return [m for _, m in self._parts()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{k}": p.detach() for prefix, m in self._parts() for k, p in m.named_parameters()}
        if self.identifier_rows is not None:
            out.update(self.identifier_rows.state_dict())
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.identifier_rows is not None:
            rows = {k: v for k, v in state.items() if k.startswith(IDENTIFIER_STATE)}
            self.identifier_rows.load_state_dict(rows)
            state = {k: v for k, v in state.items() if not k.startswith(IDENTIFIER_STATE)}
        expected = {k: v for k, v in self.state_dict().items() if not k.startswith(IDENTIFIER_STATE)}
        if set(state) != set(expected):
            raise SdtuneError(f"saved DreamBooth weights do not match this model ({len(state)} tensors saved, "
                              f"{len(expected)} expected); was the model, --train-text-encoder or --train-identifier changed?")
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
        if bad:
            raise SdtuneError(f"saved DreamBooth weights have other shapes than this model ({bad[0]}); was the model "
                              "changed?")
        with torch.no_grad():
            for k, v in state.items():
                expected[k].copy_(v.to(expected[k].device, expected[k].dtype))

    def metadata(self) -> dict[str, str]:
        rows = self.identifier_rows.metadata() if self.identifier_rows is not None else {}
        return {"sdtune_dreambooth_text_encoder": str(bool(self.options.train_text_encoder)),
                **self.personalize_metadata(), **rows}

    def save(self, path: str | Path, step: int, metadata: Mapping[str, str]) -> Path:
        from sdtune.formats.checkpoint import save_single_file

        assert self.model is not None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in {**dict(metadata), **self.metadata(), "sdtune_step": str(step)}.items()
                if not k.startswith("ss_")}
        pipe = self.model.pipe
        if self.identifier_rows is not None:
            self.identifier_rows.write_rows()
        written = save_single_file(pipe, path, self.model.family, dtype=PRECISIONS[self.options.save_precision],
                                   metadata=meta)
        if self.options.diffusers_folder:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}.tmp-"))
            try:
                from sdtune.models.loading import quiet_loading

                from sdtune.paths import writing

                with quiet_loading(), writing(path.with_suffix("")):  # a full disk: one line naming the folder
                    pipe.save_pretrained(tmp, safe_serialization=True)
                _replace_dir(tmp, path.with_suffix(""))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._remove_orphans(path.parent)
        return written

    def _remove_orphans(self, folder: Path) -> None:
        """Diffusers folders whose checkpoint file was pruned (keep_checkpoints best/last)."""
        for d in folder.iterdir():
            if d.is_dir() and not d.name.startswith(".") and not d.with_suffix(self.file_ext).exists():
                shutil.rmtree(d, ignore_errors=True)

    def finalize(self, final: Path, source: Path, ctx: TrainingContext) -> None:
        """OUT/<name>/: the diffusers folder of the final (best) checkpoint."""
        folder = source.with_suffix("")
        if not self.options.diffusers_folder or not folder.is_dir():
            return
        dest = final.with_suffix("")
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
        try:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
            _replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._remove_orphans(source.parent)
        ctx.echo(f"saved diffusers folder {dest}")

    def teardown(self) -> None:
        if self.identifier_rows is not None:
            self.identifier_rows.remove()
