"""The real CLIP tokenizer (SD1/SD2/SDXL), built offline from OpenAI CLIP's BPE file shipped in configs/clip.

CLIP's vocabulary is fully determined by its merge list: the 256 byte-level characters, the same with "</w>",
one entry per merge (the two halves joined), then <|startoftext|> and <|endoftext|> (49408 entries)."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

CLIP_VOCAB_SIZE = 49408
_N_MERGES = CLIP_VOCAB_SIZE - 256 - 256 - 2  # 48894 merges; lines[1 : 48894 + 1] of the BPE file


def _bpe_path() -> Path:
    return Path(str(resources.files("sdtune.models") / "configs" / "clip" / "bpe_simple_vocab_16e6.txt.gz"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id, merges as "a b" strings) of the CLIP tokenizer, derived from the BPE file."""
    lines = gzip.open(_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = tuple(lines[1:_N_MERGES + 1])
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


@lru_cache(maxsize=4)
def _clip_tokenizer(pad_token: str, model_max_length: int) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # transformers annotates merges as list[str]; the tokenizers BPE it builds takes (a, b) pairs, as given here
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs,  # type: ignore[arg-type]
                         pad_token=pad_token, model_max_length=model_max_length)


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> Any:
    """A transformers CLIPTokenizer equal to openai/clip-vit-large-patch14's; SD2 and SDXL's second tokenizer use
    pad_token "!" (id 0) instead of <|endoftext|>. Each call returns an independent copy (callers may add tokens,
    e.g. for textual inversion)."""
    import copy

    return copy.deepcopy(_clip_tokenizer(pad_token, model_max_length))


def tokenizer_from_files(vocab: dict[str, int], merges: list[str], special: dict[str, str]) -> Any:
    """A CLIPTokenizer from an explicit vocab/merges (used for non-standard vocabularies such as `tiny`'s)."""
    from transformers import CLIPTokenizer

    pairs = [tuple(m.split(" ", 1)) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, **special)  # type: ignore[arg-type]  # pairs: see above


def tokenizer_for(model: str | None) -> Any:
    """The tokenizer `model` uses, without loading the model: single-file checkpoints use SD's CLIP tokenizer
    (shipped with sdtune), diffusers folders (and `tiny`) their own."""
    from sdtune.errors import SdtuneError
    from sdtune.models.bundled import bundled_model_path, is_bundled_model

    if model is None:
        return clip_tokenizer()
    if is_bundled_model(model):
        path = bundled_model_path(check=False)
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise SdtuneError(f"model {model!r} not found; pass a diffusers folder, a checkpoint file or `tiny`")
    from sdtune.paths import check_readable

    check_readable(path, f"--model {model}")
    if path.is_file():
        return clip_tokenizer()
    for sub in ("tokenizer", "tokenizer_2"):
        if (path / sub).is_dir():
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(str(path / sub))
    raise SdtuneError(f"{path} has no tokenizer/ folder; pass a diffusers pipeline folder or a checkpoint file")
