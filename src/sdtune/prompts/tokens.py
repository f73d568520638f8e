"""Weighted fragments -> 75-token chunks, as A1111 builds them.

Each fragment is tokenized on its own (without BOS/EOS) and its tokens get its weight. Tokens fill chunks of 75;
each chunk becomes BOS + 75 tokens + EOS when encoded (`chunk_ids`), padded after EOS with the tokenizer's pad token
(EOS for SD1, "!" for SD2/SDXL's second encoder), exactly what the tokenizer itself produces for a short prompt.

- BREAK ends the current chunk (an empty prompt, or BREAK at the start, still gives one chunk).
- When a chunk is full and more tokens follow, the chunk is cut after its last comma if that comma is within the
  last `comma_backtrack` tokens (A1111's default 20; 0 turns it off); the tokens after it move to the next chunk.
- An embedding's n vectors never split across chunks: if they do not fit, the chunk is closed first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.prompts.fragments import Fragment

CHUNK = 75
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class PromptToken:
    id: int            # token id (a placeholder for embedding vectors)
    weight: float
    fragment: int      # index of the fragment it came from
    embedding: str | None = None
    vector: int = 0    # which of the embedding's vectors


def check_text(text: str, what: str = "the prompt", *, part: bool = False) -> None:
    """Raise a one-line SdtuneError if `text` cannot be tokenized: it holds a lone surrogate, which is what
    invalid UTF-8 bytes in a command line become (Python's surrogateescape) and what no tokenizer accepts (any
    surrogate code point in a str is one UTF-8 cannot encode). part: `text` is a piece of the prompt (the
    message quotes it, since the position is within the piece)."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        where = f" of {text[:40]!a}" if part else ""
        raise SdtuneError(f"{what} is not valid text (unpaired surrogate / invalid UTF-8 {bad.group()!a} at "
                          f"position {bad.start()}{where}); retype it, or save the file it came from as UTF-8")


def _token_ids(tokenizer: Any, pieces: list[str]) -> list[list[int]]:
    if not pieces:
        return []
    for piece in pieces:
        check_text(piece, part=True)
    return tokenizer(pieces, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def chunk_tokens(fragments: tuple[Fragment, ...], tokenizer: Any, embeddings: Any = None, *,
                 comma_backtrack: int = 20) -> list[list[PromptToken]]:
    """The chunks (lists of at most 75 tokens, without BOS/EOS) for these fragments."""
    # cut every fragment at embedding names, then tokenize all text pieces in one call
    plan: list[tuple[int, str, bool]] = []  # (fragment index, text or name, is_name)
    for index, frag in enumerate(fragments):
        if frag.is_break:
            plan.append((index, "", False))
            continue
        pieces = embeddings.split(frag.text) if embeddings is not None else [frag.text]
        for k, piece in enumerate(pieces):
            if piece or k % 2:
                plan.append((index, piece, bool(k % 2)))
    ids = iter(_token_ids(tokenizer, [p for i, p, is_name in plan if not is_name and not fragments[i].is_break]))
    comma = tokenizer.convert_tokens_to_ids(",</w>") if comma_backtrack else None
    placeholder = tokenizer.bos_token_id

    chunks: list[list[PromptToken]] = []
    chunk: list[PromptToken] = []
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for index, piece, is_name in plan:
        frag = fragments[index]
        if frag.is_break:
            close()
            continue
        if is_name:
            n = embeddings.num_vectors(piece)
            if len(chunk) + n > CHUNK:
                close()
            chunk.extend(PromptToken(placeholder, frag.weight, index, piece, v) for v in range(n))
            continue
        for token in next(ids):
            if token == comma:
                last_comma = len(chunk)
            elif len(chunk) == CHUNK and last_comma != -1 and len(chunk) - last_comma <= comma_backtrack:
                moved = chunk[last_comma + 1:]
                chunk = chunk[:last_comma + 1]
                close()
                chunk = moved
            if len(chunk) == CHUNK:
                close()
            chunk.append(PromptToken(token, frag.weight, index))
    if chunk or not chunks:
        close()
    return chunks


def chunk_ids(chunk: list[PromptToken], tokenizer: Any) -> tuple[list[int], list[float]]:
    """77 ids (BOS, tokens, EOS, padding) and their weights (1 for BOS, EOS and padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id] + [t.id for t in chunk] + [tokenizer.eos_token_id]
    weights = [1.0] + [t.weight for t in chunk] + [1.0]
    rest = CHUNK + 2 - len(ids)
    return ids + [pad] * rest, weights + [1.0] * rest
