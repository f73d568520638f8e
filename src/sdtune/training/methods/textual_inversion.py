"""`ti`: Textual Inversion - learn n new vectors for a word (per text encoder; SDXL learns a clip_l and a clip_g
part) while the UNet, the VAE and the text encoders stay frozen.

    sdtune train ti --data data/star --out runs/star --token "<star>" --init shape --vectors 2 --steps 300 \\
        --lr 5e-3 --templates object

How it trains: the trained weights are one separate [n, width] tensor per text encoder. They are spliced into the
text encoder's token-embedding output at the token's positions by the same forward hook generation uses
(`prompts.encoder.TextConditioner` with an `EmbeddingRegistry`), with gradients on. Neither the tokenizer nor the
embedding matrix changes: the optimizer holds state for n x width numbers, and nothing has to be restored after
a step. The token's positions carry the BOS id as placeholder, so SDXL's pooled vector is still taken at the EOS
position. Latents come from the loop's cache (encoded once per flip variant); text-encoder outputs cannot be
cached, they depend on the trained vectors.

Captions: each example's prompt is a template (`--templates`) with `[name]` (or `{}`) replaced by the token and
`[filewords]` by the image's caption (its .txt sidecar, in which `[name]` is replaced too). Built-in lists:
object, style (the prompts of the original method's object and style modes, worded here), object_filewords,
style_filewords, filewords (the caption alone); or a FILE with one template per line. The template of an example
is drawn from (seed, step, example), so runs repeat exactly.

Initial vectors: the init text's tokens' embedding rows. With k tokens and n vectors: n = 1 averages all k;
n >= k cycles them (vector i = token i mod k); 1 < n < k splits the tokens into n consecutive groups and averages
each. Every init word must be a whole token of the vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from sdtune.adapters.textual_inversion.files import (
    FORMAT_EXT,
    FORMATS,
    SDXL_REFUSED,
    Embedding,
    file_stem_for,
    write_embedding,
)
from sdtune.errors import SdtuneError
from sdtune.prompts.embeddings import MAX_VECTORS, EmbeddingRegistry
from sdtune.training.options import opt
from sdtune.training.methods.base import TrainingMethod

if TYPE_CHECKING:
    from sdtune.generate.generator import Generator
    from sdtune.models.loading import LoadedModel
    from sdtune.training.config import TrainConfig

OBJECT_TEMPLATES = [
    "a photo of a [name]", "a rendering of a [name]", "a cropped photo of the [name]", "the photo of a [name]",
    "a photo of a clean [name]", "a photo of a dirty [name]", "a dark photo of the [name]", "a photo of my [name]",
    "a photo of the cool [name]", "a close-up photo of a [name]", "a bright photo of the [name]",
    "a cropped photo of a [name]", "a photo of the [name]", "a good photo of the [name]", "a photo of one [name]",
    "a close-up photo of the [name]", "a rendition of the [name]", "a photo of the clean [name]",
    "a rendition of a [name]", "a photo of a nice [name]", "a good photo of a [name]", "a photo of the nice [name]",
    "a photo of the small [name]", "a photo of the weird [name]", "a photo of the large [name]",
    "a photo of a cool [name]", "a photo of a small [name]",
]
STYLE_TEMPLATES = [
    "a painting in the style of [name]", "a rendering in the style of [name]", "a cropped painting in the style of "
    "[name]", "the painting in the style of [name]", "a clean painting in the style of [name]", "a dirty painting "
    "in the style of [name]", "a dark painting in the style of [name]", "a picture in the style of [name]",
    "a cool painting in the style of [name]", "a close-up painting in the style of [name]", "a bright painting in "
    "the style of [name]", "a good painting in the style of [name]", "a rendition in the style of [name]",
    "a nice painting in the style of [name]", "a small painting in the style of [name]", "a weird painting in the "
    "style of [name]", "a large painting in the style of [name]",
]
BUILTIN_TEMPLATES = {
    "object": OBJECT_TEMPLATES,
    "style": STYLE_TEMPLATES,
    "object_filewords": [t + ", [filewords]" for t in OBJECT_TEMPLATES],
    "style_filewords": [t + ", [filewords]" for t in STYLE_TEMPLATES],
    "filewords": ["[filewords]"],
}
_BAD_NAME = set("()[]:|/\\")
_BAD_START = set(".,;")


@dataclass
class TIOptions:
    token: str | None = opt(None, "The new word, e.g. \"<star>\" (used in prompts; the file is named after it).",
                            section="ti", kind="str", metavar="TEXT")
    init: str = opt("*", "Word(s) whose embeddings start the vectors (several tokens: averaged or cycled).",
                    section="ti", kind="str", metavar="TEXT")
    vectors: int = opt(1, "Vectors per token (1-75; more learn more detail and use more of the prompt).",
                       section="ti", kind="int")
    templates: str = opt("object", "Prompt templates: object, style, object_filewords, style_filewords, "
                         "filewords, or a text file with one template per line ([name], [filewords]).",
                         section="ti", kind="str", metavar="NAME|FILE")
    format: str = opt("safetensors", "File format: safetensors (with metadata), diffusers, a1111 (.pt), kohya, "
                      "sdxl, png (A1111 image embedding).", section="ti", kind="str", choices=FORMATS)
    force: bool = opt(False, "Train a token that already exists in the vocabulary.", section="ti", kind="bool")


def load_templates(spec: str) -> list[str]:
    """The templates of a built-in list name or a file (one per line, blank lines and #comments ignored)."""
    if spec in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[spec])
    p = Path(spec).expanduser()
    if not p.is_file():
        raise SdtuneError(f"templates {spec!r} is neither a built-in list ({', '.join(BUILTIN_TEMPLATES)}) nor a "
                          "file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SdtuneError(f"templates file {p} is unreadable ({exc})") from None
    out = [ln.strip().replace("{}", "[name]") for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not out:
        raise SdtuneError(f"templates file {p} has no templates; write one per line, e.g. 'a photo of a [name]'")
    if not any("[name]" in t or "[filewords]" in t for t in out):
        raise SdtuneError(f"templates file {p}: no line uses [name] or [filewords]; the token would never be "
                          "trained")
    return out


def fill(template: str, caption: str, token: str) -> str:
    from sdtune.training.captions import fill_template

    return fill_template(template, caption, token).replace("[name]", token)


def init_vectors(rows: torch.Tensor, n: int) -> torch.Tensor:
    """n vectors from k init-token rows [k, d]: averaged (n = 1), cycled (n >= k) or group-averaged."""
    k = rows.shape[0]
    if n == 1:
        return rows.mean(0, keepdim=True)
    if n >= k:
        return torch.stack([rows[i % k] for i in range(n)])
    groups = torch.tensor_split(torch.arange(k), n)
    return torch.stack([rows[g].mean(0) for g in groups])


def token_in_vocab(tokenizer: Any, token: str) -> bool:
    vocab = tokenizer.get_vocab()
    return token in vocab or (token.lower() + "</w>") in vocab or token in getattr(tokenizer, "added_tokens_encoder",
                                                                                   {})


def init_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the init text; every word must be a whole token of the vocabulary."""
    ids: list[int] = []
    for word in text.split():
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1:
            shown = " ".join(p.replace("</w>", "") for p in pieces)
            raise SdtuneError(f"init word {word!r} is not in the vocabulary (it splits into {len(pieces)} pieces: "
                              f"{shown}); use common words, e.g. --init \"shape\"")
        ids += tokenizer.convert_tokens_to_ids(pieces)
    if not ids:
        raise SdtuneError("init text is empty; pass --init WORD(S), e.g. --init \"shape\"")
    return ids


def check_token(token: str | None, flag: str = "--token") -> None:
    """A new word's name must be usable in prompts and as a file name: one word, no control characters, none of
    the characters the prompt syntax uses, not starting with punctuation captions glue to the word before."""
    if not token or not token.strip():
        raise SdtuneError(f"no token; pass {flag} \"<name>\" (the word prompts will use)")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in token):
        raise SdtuneError(f"token {token!a} contains control characters or invalid UTF-8; use a plain word "
                          "such as \"<star>\"")
    if any(c.isspace() for c in token) or _BAD_NAME & set(token):
        raise SdtuneError(f"token {token!r} must be one word without spaces or ()[]:|/\\ characters")
    if token[0] in _BAD_START:  # captions glue it to the word before ("a photo of .x" -> "a photo of.x")
        raise SdtuneError(f"token {token!r} must not start with {token[0]!r}; use a word such as \"<star>\"")


def encode_captions(conditioner: Any, captions: list[str], dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [N, 77 * chunks, D], pooled or None) of plain captions with a `TextConditioner` whose
    embeddings may be trainable: what training conditions the UNet on, as generation encodes them."""
    from sdtune.prompts.fragments import Fragment

    encs = [conditioner.encode((Fragment(c),), "ignore") for c in captions]
    n = max(e.chunks for e in encs)
    encs = [conditioner.pad(e, n) for e in encs]
    hidden = torch.stack([e.hidden.reshape(-1, e.hidden.shape[-1]) for e in encs])
    pooled = None if encs[0].pooled is None else torch.stack([e.pooled for e in encs])
    dtype = dtype or hidden.dtype
    return hidden.to(dtype), None if pooled is None else pooled.to(dtype)


@contextlib.contextmanager
def sampling_embedding(generator: Generator, token: str, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While inside, `generator`'s prompt encoder knows `token` with a copy of the current vectors (samples and
    the judge during training); its own embeddings are untouched."""
    enc = generator.encode_prompt
    if not hasattr(enc, "embeddings"):
        raise SdtuneError("the generator's prompt encoder does not take embeddings; use WeightedPromptEncoder")
    old = enc.embeddings
    reg = EmbeddingRegistry()
    if old is not None:
        for name in old:
            reg._items[name] = old._items[name]
    reg.add(token, {k: v.detach().clone() for k, v in params.items()})
    enc.embeddings = reg
    try:
        yield
    finally:
        enc.embeddings = old


class _LiveRegistry(EmbeddingRegistry):
    """A registry whose one embedding returns the trainable tensors themselves (gradients flow into them)."""

    def __init__(self, name: str, params: Mapping[str, torch.Tensor]) -> None:
        super().__init__({name: {k: p.detach() for k, p in params.items()}})
        self.params = dict(params)

    def vectors(self, name: str, key: str, width: int) -> Any:
        return self.params[key]


class TextualInversionMethod(TrainingMethod):
    name = "ti"
    summary = "Textual Inversion: a new word (n vectors per text encoder); everything else frozen."
    Options = TIOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.file_ext = FORMAT_EXT[self.options.format]
        self.params: dict[str, torch.nn.Parameter] = {}
        self.templates: list[str] = []

    # -- configuration ----------------------------------------------------------------------------------------

    @classmethod
    def check_options(cls, options: Any, config: TrainConfig) -> None:
        token = options.token
        check_token(token)
        if config.output_name is None:  # the file will be named after the token
            config.check_output_name(file_stem_for(token), f"token {token!r} gives the file name")
        if not 1 <= options.vectors <= MAX_VECTORS:
            raise SdtuneError(f"vectors {options.vectors} must be between 1 and {MAX_VECTORS} (1-8 is typical)")
        if not options.init or not options.init.strip():
            raise SdtuneError("init text is empty; pass --init WORD(S), e.g. --init \"shape\"")
        if options.format not in FORMATS:
            raise SdtuneError(f"format {options.format!r} is not one of {', '.join(FORMATS)}")
        load_templates(options.templates)

    # -- setup ------------------------------------------------------------------------------------------------

    def setup(self, model: LoadedModel, config: TrainConfig) -> list[dict[str, Any]]:
        from sdtune.prompts.encoder import TextConditioner, encoder_slots

        self.model, self.config = model, config
        opts = self.options
        if opts.format == "sdxl" and model.family != "sdxl":
            raise SdtuneError(f"format sdxl is for SDXL models; {model.name} is {model.family}")
        if model.family == "sdxl" and opts.format in SDXL_REFUSED:  # before training, not at the first save
            raise SdtuneError(SDXL_REFUSED[opts.format])
        if config.output_name is None:  # the file is named after the token (A1111: the name in prompts)
            config.output_name = file_stem_for(opts.token)
        self.templates = load_templates(opts.templates)
        slots = encoder_slots(model.pipe)
        for s in slots:
            if token_in_vocab(s.tokenizer, opts.token) and not opts.force:
                raise SdtuneError(f"token {opts.token!r} already exists in the vocabulary; pick a new word such as "
                                  f"\"<{file_stem_for(opts.token)}>\", or pass --force to train it anyway")
        self.params = {}
        for s in slots:
            ids = init_ids(s.tokenizer, opts.init)
            table = s.model.get_input_embeddings().weight
            rows = table.detach()[torch.tensor(ids, device=table.device)].float()
            self.params[s.key] = torch.nn.Parameter(init_vectors(rows, opts.vectors).clone())
        self.registry = _LiveRegistry(opts.token, self.params)
        self.conditioner = TextConditioner(model.pipe, clip_skip=config.clip_skip, embeddings=self.registry)
        self.conditioner.grad = True
        return [{"params": list(self.params.values())}]

    def modules(self) -> list[torch.nn.Module]:
        return []  # nothing switches between train and eval mode: the frozen models stay in eval mode

    # -- the step ---------------------------------------------------------------------------------------------

    def prompt_for(self, caption: str, step: int, position: int, index: int | None) -> str:
        assert self.config is not None
        if index is None:  # validation: one fixed template per caption
            rng = random.Random(f"{self.config.seed}:ti-val:{caption}")
        else:
            rng = random.Random(f"{self.config.seed}:ti:{step}:{position}:{index}")
        return fill(rng.choice(self.templates), caption, self.options.token)

    def encode_text(self, captions: list[str], *, step: int = 0,
                    indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = self.model.pipe.unet.dtype if self.model is not None else None
        return encode_captions(self.conditioner, captions, dtype)

    def conditioning(self, batch: Any) -> Any:
        indices = batch.indices or [None] * len(batch.captions)
        first = getattr(batch, "offset", 0)  # positions in the global batch: N processes pick what one would
        prompts = [self.prompt_for(c, batch.step, first + i, idx)
                   for i, (c, idx) in enumerate(zip(batch.captions, indices))]
        self.last_prompts = prompts
        return super().conditioning(type(batch)(latents=batch.latents, captions=prompts, indices=batch.indices,
                                                flipped=batch.flipped, time_ids=batch.time_ids, step=batch.step))

    # -- weights ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.params.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.params) or any(state[k].shape != self.params[k].shape for k in state):
            have = ", ".join(f"{k} {list(v.shape)}" for k, v in state.items())
            want = ", ".join(f"{k} {list(v.shape)}" for k, v in self.params.items())
            raise SdtuneError(f"saved embedding ({have}) does not match this run ({want}); were --vectors or the "
                              "model changed?")
        with torch.no_grad():
            for k, v in state.items():
                self.params[k].copy_(v.to(self.params[k].device, self.params[k].dtype))

    def embedding(self, step: int | None = None, name: str | None = None) -> Embedding:
        assert self.config is not None
        return Embedding(name=name or self.config.name, vectors={k: v.cpu().float() for k, v in
                                                                 self.state_dict().items()},
                         token=self.options.token, step=step)

    def metadata(self) -> dict[str, str]:
        from sdtune.version import __version__

        return {"sdtune_ti_token": self.options.token, "sdtune_ti_vectors": str(self.options.vectors),
                "sdtune_ti_init": self.options.init, "sdtune_ti_templates": self.options.templates,
                "sdtune_version": __version__, "sdtune_ti_encoders": json.dumps(sorted(self.params))}

    def save(self, path: str | Path, step: int, metadata: Mapping[str, str]) -> Path:
        assert self.model is not None
        meta = {**dict(metadata), **self.metadata(), "sdtune_step": str(step)}
        emb = self.embedding(step, name=Path(path).stem)
        return write_embedding(emb, path, self.options.format, metadata=meta, checkpoint_hash=self.model.hash,
                               checkpoint_name=self.model.name)

    # -- sampling ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def apply_for_sampling(self, generator: Generator) -> Iterator[Generator]:
        """The generator's prompt encoder sees the token with the current vectors (a copy) while sampling."""
        with sampling_embedding(generator, self.options.token, self.params):
            yield generator
