"""Pivotal tuning (`sdtune train lora --pivotal`): a new word learned as Textual Inversion next to the LoRA, so the
LoRA does not have to bend an existing word (`sks`, "shape") into the concept.

    sdtune train lora --data data/heart --out runs/heart --prompt "a photo of TOK shape" --pivotal \\
        --pivotal-tokens 2 --pivotal-init shape --pivotal-frac 0.5

The word (`--pivotal-token`, default `<s0><s1>`: one `<sI>` per vector, as diffusers' advanced trainers name them)
replaces `--pivotal-abstraction` (default TOK, diffusers' `--token_abstraction`) in the instance prompt and every
caption; a caption with neither the abstraction nor the word stops the run before training (the word would never
be trained from it). Users then prompt with the word: "a photo of <s0><s1> shape".

It is one `PivotalWord` composed inside the LoRA method (no second loop): the vectors are a separate parameter group
(`--pivotal-lr`, default 5e-3 as a scale of the run's schedule) spliced into the text encoder output by the same
hook Textual Inversion and generation use. They train for the first `--pivotal-frac` of the steps (diffusers'
`--train_text_encoder_ti_frac`, default 0.5); after that they get no gradient, so the optimizer leaves them exactly
as they are and the text encodings are cached again. The vectors are part of the method's state, so resume is exact.

Files: the LoRA (kohya layout) carries the word as A1111 reads bundled embeddings (`bundle_emb.<word>.
string_to_param.*` for SD1/SD2, `.clip_l` / `.clip_g` for SDXL), so `sdtune generate --lora` or `<lora:name:1>`
makes the word usable with no other flag; OUT/embeddings/<word>.safetensors holds the same vectors as a separate
embedding (`emb_params`, or clip_l/clip_g for SDXL) for A1111's and ComfyUI's embeddings folders and diffusers'
`load_textual_inversion`.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.prompts.embeddings import EmbeddingRegistry
from sdtune.training.methods.base import copy_saved, same_layout
from sdtune.training.options import opt

if TYPE_CHECKING:
    from sdtune.generate.generator import Generator
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig
    from sdtune.training.context import TrainingContext

MAX_TOKENS = 16
DEFAULT_LR = 5e-3
STATE_PREFIX = "pivotal."


@dataclass
class PivotalOptions:
    """The LoRA method's pivotal-tuning options (declared here, inherited by `LoraOptions`)."""

    pivotal: bool = opt(False, "Pivotal tuning: also learn a new word (Textual Inversion vectors) with the LoRA; it "
                        "replaces --pivotal-abstraction in the captions and is bundled in the LoRA file.",
                        section="pivotal", kind="bool")
    pivotal_tokens: int = opt(2, f"Vectors of the new word (1-{MAX_TOKENS}; diffusers' "
                              "--num_new_tokens_per_abstraction).", section="pivotal", kind="int")
    pivotal_token: str | None = opt(None, "The new word used in prompts (default <s0><s1>..., one <sI> per "
                                    "vector).", section="pivotal", kind="str", metavar="TEXT")
    pivotal_abstraction: str = opt("TOK", "The word of --prompt and the captions that the new word replaces "
                                   "(diffusers' --token_abstraction), e.g. sks.", section="pivotal", kind="str",
                                   metavar="WORD")
    pivotal_init: str = opt("*", "Word(s) whose embeddings start the vectors (as train ti --init), e.g. shape.",
                            section="pivotal", kind="str", metavar="TEXT")
    pivotal_frac: float = opt(0.5, "Fraction of the steps in which the word trains, from the start (then the LoRA "
                              "alone); 1 = jointly for the whole run.", section="pivotal", kind="float")
    pivotal_lr: float | None = opt(None, f"Learning rate of the word's vectors (default {DEFAULT_LR:g}); it follows "
                                   "the run's schedule.", section="pivotal", kind="float")


def default_token(n: int) -> str:
    return "".join(f"<s{i}>" for i in range(n))


def token_of(options: Any) -> str:
    return str(options.pivotal_token or default_token(options.pivotal_tokens))


def _word(text: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(text) + r"(?!\w)")


def check_pivotal_options(options: Any, config: TrainConfig) -> None:
    """One-line errors before anything loads."""
    from sdtune.training.methods.textual_inversion import check_token

    set_without = [n for n in ("pivotal_token", "pivotal_lr") if getattr(options, n) is not None]
    if not options.pivotal:
        if set_without:
            raise SdtuneError(f"{set_without[0]} is set but pivotal tuning is off; add --pivotal")
        return
    if not 1 <= options.pivotal_tokens <= MAX_TOKENS:
        raise SdtuneError(f"pivotal_tokens {options.pivotal_tokens} must be between 1 and {MAX_TOKENS} (2 is "
                          "typical)")
    if not 0 < options.pivotal_frac <= 1 or options.pivotal_frac != options.pivotal_frac:
        raise SdtuneError(f"pivotal_frac {options.pivotal_frac} must be in (0, 1]: the fraction of the steps in "
                          "which the word trains (1 = the whole run)")
    if options.pivotal_lr is not None and not options.pivotal_lr > 0:
        raise SdtuneError(f"pivotal_lr {options.pivotal_lr} must be > 0 (1e-3 to 5e-3 is typical)")
    token = token_of(options)
    check_token(token, "--pivotal-token")
    abstraction = (options.pivotal_abstraction or "").strip()
    if not abstraction or any(c.isspace() for c in abstraction):
        raise SdtuneError(f"pivotal_abstraction {options.pivotal_abstraction!r} must be one word (the caption word "
                          "the new word replaces, e.g. TOK or sks)")
    if abstraction in token or token in abstraction:
        raise SdtuneError(f"pivotal_token {token!r} and pivotal_abstraction {abstraction!r} overlap; pick a word "
                          "the captions use (e.g. sks) and a new token (e.g. <s0><s1>)")
    if not options.pivotal_init.strip():
        raise SdtuneError("pivotal_init is empty; pass --pivotal-init WORD(S), e.g. shape")
    if options.format != "kohya":
        raise SdtuneError(f"--pivotal bundles the word in the LoRA file, which the {options.format} layout cannot "
                          "hold (A1111 reads bundled embeddings from kohya files); use --format kohya")
    if options.prompt is not None and not (_word(abstraction).search(options.prompt) or token in options.prompt):
        raise SdtuneError(f"--prompt {options.prompt!r} contains neither {abstraction!r} (--pivotal-abstraction) "
                          f"nor {token!r}; write the word the new token replaces into it, e.g. 'a photo of "
                          f"{abstraction} shape'")


class _Registry(EmbeddingRegistry):
    """The one trained word; its vectors are the trainable tensors while `live` (gradients flow into them), and
    detached after --pivotal-frac (no gradient, so the optimizer leaves them unchanged)."""

    def __init__(self, name: str, params: Mapping[str, torch.nn.Parameter]) -> None:
        super().__init__({name: {k: p.detach() for k, p in params.items()}})
        self.params = dict(params)
        self.live = True

    def vectors(self, name: str, key: str, width: int) -> Any:
        p = self.params[key]
        return p if self.live else p.detach()


class PivotalWord:
    """The word of a pivotal-tuning run: its vectors, their encoding, state and files (used by `LoraMethod`)."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.token = token_of(options)
        self.abstraction = options.pivotal_abstraction.strip()
        self.params: dict[str, torch.nn.Parameter] = {}
        self.stop_step = 0

    def setup(self, model: LoadedModel, config: TrainConfig) -> dict[str, Any]:
        """The vectors (initialised from --pivotal-init) and their optimizer param group."""
        from sdtune.prompts.encoder import TextConditioner, encoder_slots
        from sdtune.training.methods.textual_inversion import init_ids, init_vectors, token_in_vocab
        from sdtune.training.schedules import LRSchedule

        slots = encoder_slots(model.pipe)
        if any(token_in_vocab(s.tokenizer, self.token) for s in slots):
            raise SdtuneError(f"pivotal_token {self.token!r} is already a word of the vocabulary; pick a new one "
                              "such as <s0><s1>")
        for s in slots:
            table = s.model.get_input_embeddings().weight
            rows = table.detach()[torch.tensor(init_ids(s.tokenizer, self.options.pivotal_init),
                                               device=table.device)].float()
            self.params[s.key] = torch.nn.Parameter(init_vectors(rows, self.options.pivotal_tokens).clone())
        self.registry = _Registry(self.token, self.params)
        self.conditioner = TextConditioner(model.pipe, clip_skip=config.clip_skip, embeddings=self.registry)
        self.conditioner.grad = True
        self.dtype = model.pipe.unet.dtype
        self.stop_step = max(1, math.ceil(self.options.pivotal_frac * config.total_steps))
        lr = self.options.pivotal_lr if self.options.pivotal_lr is not None else DEFAULT_LR
        peak = LRSchedule.from_config(config.lr, config.lr_scheduler, config.warmup_steps, config.total_steps).peak
        return {"params": list(self.params.values()), "lr_scale": lr / peak}

    def prepare(self, ctx: TrainingContext) -> None:
        """The abstraction becomes the word in every caption; a caption with neither stops the run now."""
        pattern = _word(self.abstraction)
        lacking: list[str] = []

        def caption_of(item: Any) -> str:
            text = pattern.sub(self.token, item.caption)
            if not _word(self.token).search(text):
                lacking.append(item.caption)
            return text

        ctx.map_captions(caption_of)
        if lacking:
            raise SdtuneError(f"{len(lacking)} caption(s) contain neither {self.abstraction!r} "
                              f"(--pivotal-abstraction) nor {self.token!r}, e.g. {lacking[0]!r}; write the word into "
                              "them (or --prompt 'a photo of TOK shape' for images without captions)")
        frac = "the whole run" if self.stop_step >= ctx.config.total_steps else f"steps 1-{self.stop_step}"
        ctx.echo(f"pivotal tuning: new word {self.token} ({self.options.pivotal_tokens} vector(s), init "
                 f"{self.options.pivotal_init!r}) replaces {self.abstraction!r} in the captions; trained in {frac}")

    def trains_at(self, step: int) -> bool:
        return step <= self.stop_step

    def encode(self, captions: list[str], step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        from sdtune.training.methods.textual_inversion import encode_captions

        self.registry.live = self.trains_at(step)
        return encode_captions(self.conditioner, captions, self.dtype)

    # -- state and files ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {STATE_PREFIX + k: p.detach() for k, p in self.params.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        want = self.state_dict()
        if not same_layout(state, want):
            have = ", ".join(f"{k} {list(v.shape)}" for k, v in state.items()) or "none"
            raise SdtuneError(f"saved pivotal vectors ({have}) do not match this run "
                              f"({', '.join(f'{k} {list(v.shape)}' for k, v in want.items())}); were --pivotal or "
                              "--pivotal-tokens changed?")
        copy_saved(self.params, state, STATE_PREFIX)

    def bundle(self) -> dict[str, dict[str, torch.Tensor]]:
        """{word: vectors} as the LoRA file bundles them: one encoder -> "*" (A1111's string_to_param.*)."""
        vecs = {k: p.detach().to("cpu", torch.float32) for k, p in self.params.items()}
        if len(vecs) == 1:
            vecs = {"*": next(iter(vecs.values()))}
        return {self.token: vecs}

    def metadata(self) -> dict[str, str]:
        o = self.options
        return {"sdtune_pivotal_token": self.token, "sdtune_pivotal_vectors": str(o.pivotal_tokens),
                "sdtune_pivotal_abstraction": self.abstraction, "sdtune_pivotal_init": o.pivotal_init,
                "sdtune_pivotal_frac": f"{o.pivotal_frac:g}", "sdtune_pivotal_stop_step": str(self.stop_step)}

    def write_embedding(self, lora_file: Path, out: Path, ctx: TrainingContext) -> Path:
        """OUT/embeddings/<word>.safetensors from the bundled vectors of `lora_file` (the best checkpoint)."""
        from sdtune.adapters.lora import read_lora
        from sdtune.adapters.textual_inversion.files import Embedding, file_stem_for, write_embedding

        net = read_lora(lora_file)
        if self.token not in net.embeddings:
            raise SdtuneError(f"{lora_file.name} has no bundled embedding {self.token!r}; was it trained with --pivotal?")
        vecs = dict(net.embeddings[self.token])  # "*" (one encoder: written as emb_params) or clip_l + clip_g
        stem = file_stem_for(self.token)
        step = net.metadata.get("sdtune_step", "")
        emb = Embedding(name=stem, vectors=vecs, token=self.token, step=int(step) if step.isdigit() else None)
        path = write_embedding(emb, out / "embeddings" / f"{stem}.safetensors", "safetensors",
                               metadata={**self.metadata(), "sdtune_pivotal_lora": lora_file.name})
        ctx.echo(f"pivotal word {self.token}: bundled in {lora_file.name} (used with the LoRA, no other flag), "
                 f"and as a separate embedding {path}")
        return path

    @contextlib.contextmanager
    def apply_for_sampling(self, generator: Generator) -> Iterator[None]:
        from sdtune.training.methods.textual_inversion import sampling_embedding

        with sampling_embedding(generator, self.token, self.params):
            yield
