"""DreamBooth's `--train-identifier`: the identifier word's own embedding learned with the UNet, saved in the
checkpoint.

Why: with the text encoder frozen, `sks` is a rare token whose encoding moves the caption half as far as a shape
word does (`python experiments/identifier_signal.py`: 18.5 vs 36.6), so the UNet has to learn the concept from a
weak signal it shares with every other prompt, and bends those prompts too (docs/lora.md, the DreamBooth table).
Pivotal tuning answers this with a new word beside a LoRA; a DreamBooth checkpoint carries its text encoders, so
here the identifier itself can become that word: its row of each text encoder's token table is learned (Textual
Inversion on an existing token, at its own rate) and written into the table before every save. Prompts without the
identifier never read that row, so the row changes nothing else; A1111, ComfyUI, kohya and diffusers read the
checkpoint's table as it is, and users keep prompting `sks`.

The vector starts from the class noun's row (the word after the identifier in the captions: "shape" in "a red sks
shape"; `--identifier-init`), as Textual Inversion starts from an initializer word: sks then begins as a word of the
right class, and the UNet and the vector refine it, instead of the vector travelling from an unrelated rare token
(on the toy world's diamond, context images 74/83/85/72% -> 83/91/89/91% for seeds 0-3;
docs/lora.md).

Only an identifier that is one token in every tokenizer (sks is; CLIP splits zwx into z + wx): a piece shared
with other words would change those words too, so such an identifier is left alone (with a note, or an error when
asked for explicitly). While training, a forward hook on each token-embedding module puts the trained vector where
the identifier's token id is (the table row itself is not a parameter: its optimizer state would be the whole
vocabulary's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.training.methods.base import copy_saved, same_layout

if TYPE_CHECKING:
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig
    from sdtune.training.context import TrainingContext

DEFAULT_LR = 5e-3  # as pivotal tuning's word (training.methods.pivotal)
STATE_PREFIX = "identifier."
START_IDS = "start_ids"


def single_token_id(tokenizer: Any, word: str) -> int | None:
    """The token id of `word` when the tokenizer makes it exactly one token, else None."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return int(ids[0]) if len(ids) == 1 else None


class IdentifierRows:
    """The trained vector of the identifier's token in each text encoder (one per encoder, SDXL has two)."""

    def __init__(self, lr: float | None) -> None:
        self.lr = DEFAULT_LR if lr is None else lr
        self.params: dict[str, torch.nn.Parameter] = {}
        self.word: str | None = None
        self.init: str | None = None  # the word whose row the vectors started from (None: the identifier's own)
        self._slots: list[Any] = []
        self._ids: dict[str, int] = {}
        self._start_ids: dict[str, int] = {}  # the rows the vectors started from (recorded in the state)
        self._hooks: list[Any] = []

    def setup(self, model: LoadedModel, config: TrainConfig) -> dict[str, Any]:
        """The vectors' optimizer param group. They are filled by `start` once the identifier is known (after the
        captions are read); until then they get no gradient, so the optimizer leaves them alone."""
        from sdtune.prompts.encoder import encoder_slots
        from sdtune.training.schedules import LRSchedule

        self._slots = encoder_slots(model.pipe)
        for s in self._slots:
            table = s.model.get_input_embeddings().weight
            self.params[s.key] = torch.nn.Parameter(torch.zeros(table.shape[1], device=table.device))
        peak = LRSchedule.from_config(config.lr, config.lr_scheduler, config.warmup_steps, config.total_steps).peak
        return {"params": list(self.params.values()), "lr_scale": self.lr / peak, "weight_decay": 0.0}

    def start(self, word: str | None, ctx: TrainingContext, *, asked: bool, init: str | None = None,
              init_asked: bool = False) -> None:
        """Begin training `word`'s rows, each starting from the row of `init` (the class noun) where that is one
        token, else from its own; nothing (with a note) when there is no identifier or it is several tokens, an
        error instead when the user asked for it (`asked`; `init_asked`: an `init` of several tokens)."""
        ids = {s.key: single_token_id(s.tokenizer, word) for s in self._slots} if word else {}
        if not word or any(i is None for i in ids.values()):
            why = ("no identifier was found in the captions (pass --identifier WORD)" if not word else
                   f"the identifier {word!r} is several tokens of the vocabulary, whose pieces other words share; "
                   "use a one-token identifier such as sks")
            if asked:
                raise SdtuneError(f"--train-identifier cannot train: {why}")
            ctx.echo(f"note: the identifier's embedding is not trained: {why}")
            return
        self.word, self._ids = word, {k: int(i) for k, i in ids.items() if i is not None}
        if init_asked and init:
            self.check_init(init)
        starts = {s.key: single_token_id(s.tokenizer, init) for s in self._slots} if init else {}
        usable = bool(starts) and None not in starts.values()
        self._start_ids = {k: int(i) for k, i in starts.items() if i is not None} if usable else dict(self._ids)
        self.init = init if self._start_ids != self._ids else None
        with torch.no_grad():
            for s in self._slots:
                row = s.model.get_input_embeddings().weight[self._start_ids[s.key]]
                self.params[s.key].copy_(row.float())
        for s in self._slots:
            self._hooks.append(s.model.get_input_embeddings().register_forward_hook(self._hook(s.key)))
        whence = "--identifier-init" if init_asked else "the word after it in the captions"
        start = f"starts from {self.init!r} ({whence}) and " if self.init else ""
        if init and not usable:
            start = f"starts from its own row (the word after it, {init!r}, is several tokens) and "
        ctx.echo(f"identifier {word!r}: its embedding {start}trains with the UNet (lr {self.lr:g}) and is saved in "
                 "the checkpoint's text encoder; prompts without it are not affected by it")

    def check_init(self, init: str) -> None:
        """--identifier-init must be one token in every tokenizer (checked before class images are made)."""
        if any(single_token_id(s.tokenizer, init) is None for s in self._slots):
            raise SdtuneError(f"--identifier-init {init!r} is several tokens of the vocabulary; pass one word that is "
                              "one token (the class noun, e.g. dog or shape)")

    def _hook(self, key: str) -> Any:
        token_id, vector = self._ids[key], self.params[key]

        def put_vector(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            mask = (args[0] == token_id).unsqueeze(-1)
            return torch.where(mask, vector.to(output.dtype), output)

        return put_vector

    def reads(self, caption: str) -> bool:
        """Whether encoding `caption` reads a trained row (only those captions are encoded every step; the class
        prompts and keep-base's captions without the identifier stay cached)."""
        return self.word is not None and any(
            self._ids[s.key] in s.tokenizer(caption, add_special_tokens=False, verbose=False).input_ids
            for s in self._slots)

    def write_rows(self) -> None:
        """The trained vectors into the token tables (what a saved checkpoint must carry)."""
        if self.word is None:
            return
        with torch.no_grad():
            for s in self._slots:
                table = s.model.get_input_embeddings().weight
                table[self._ids[s.key]] = self.params[s.key].to(table.dtype)

    def remove(self) -> None:
        """Write the rows and take the hooks off (the model then reads its table as a loader of the file would)."""
        self.write_rows()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- resumable state ---------------------------------------------------------------------------------------

    def _token_ids(self) -> torch.Tensor:
        """Which rows the vectors belong to (-1: none started), so a resume cannot put them into another word's."""
        return torch.tensor([self._ids.get(s.key, -1) for s in self._slots], dtype=torch.int64)

    def state_dict(self) -> dict[str, torch.Tensor]:
        starts = torch.tensor([self._start_ids.get(s.key, -1) for s in self._slots], dtype=torch.int64)
        return {**{STATE_PREFIX + k: p.detach() for k, p in self.params.items()},
                STATE_PREFIX + "token_ids": self._token_ids(), STATE_PREFIX + START_IDS: starts}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        want = self.state_dict()
        starts = state.get(STATE_PREFIX + START_IDS)  # absent: saved when every vector started from its own row
        state = {k: v for k, v in state.items() if k != STATE_PREFIX + START_IDS}
        want.pop(STATE_PREFIX + START_IDS)
        if not same_layout(state, want):
            raise SdtuneError("saved identifier vectors do not match this run; was --train-identifier or the model "
                              "changed? (a run saved before --train-identifier existed resumes with "
                              "--no-train-identifier)")
        saved = state[STATE_PREFIX + "token_ids"].to("cpu", torch.int64)
        if not torch.equal(saved, self._token_ids()):
            raise SdtuneError(f"the saved identifier vectors belong to another word than {self.word!r} (token ids "
                              f"{saved.tolist()}, now {self._token_ids().tolist()}); resume with the captions and "
                              "--identifier of the saved run, or start a new --out")
        copy_saved(self.params, state, STATE_PREFIX)
        if self.word is not None:  # what the file's metadata says the vectors started from: the saved run's start
            ids = dict(self._ids) if starts is None else {s.key: int(i) for s, i in zip(self._slots, starts.tolist())}
            self._start_ids = ids
            first = self._slots[0]
            token = str(first.tokenizer.convert_ids_to_tokens(ids[first.key]))
            self.init = None if ids == self._ids else token.removesuffix("</w>")

    def metadata(self) -> dict[str, str]:
        if self.word is None:
            return {}
        return {"sdtune_identifier_trained": self.word, "sdtune_identifier_lr": f"{self.lr:g}",
                "sdtune_identifier_init": self.init or self.word}
