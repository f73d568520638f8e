"""A1111's attention syntax: `(x)`, `[x]`, `(x:1.5)`, escapes and BREAK, with A1111's exact results.

`parse_attention` returns what A1111's `parse_prompt_attention` returns for the same string, value for value
(including float rounding, which depends on the order the multipliers are applied in):

- `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:w)` multiplies by w; nesting multiplies.
- The weight must look like `:` [spaces] [+-] digits-and-dots [spaces] `)`. `(x:abc)` and `(x:1e9)` are therefore
  not weights: the colon and number stay text and the group is a plain `( )`, x1.1.
- `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; any other backslash is dropped.
- A bracket that is never closed applies to the end of the prompt (round ones first, then square ones); a closing
  bracket with nothing open is plain text.
- `BREAK` (a whole word, upper case) becomes `["BREAK", -1]`; neighbours with equal weights are merged; an empty
  prompt gives `[["", 1.0]]`.

The only difference from A1111: where A1111 raises on a weight such as `(x:1.2.3)` or `(x:.)` (its regex accepts
it, `float` does not), the text is kept as text and the group is a plain `( )`, as for `(x:abc)`.
"""

from __future__ import annotations

import re
from typing import Callable

from sdtune.prompts.fragments import BREAK, Fragment, clean_weight, merge

ROUND = 1.1
SQUARE = 1 / 1.1

_TOKENS = re.compile(r"""
    (?P<escaped>\\[()\[\]\\])
  | (?P<backslash>\\)
  | (?P<open>[(\[])
  | (?P<weighted>:\s*(?P<number>[+-]?[.\d]+)\s*\))
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+)
  | (?P<colon>:)
""", re.X)
_BREAK_WORD = re.compile(r"\bBREAK\b")


def split_break(text: str) -> list[str]:
    """`text` cut at the word BREAK, the whitespace around each BREAK removed (A1111 splits at `\\s*\\bBREAK\\b\\s*`).
    Found word first, whitespace trimmed by slicing: that regex backtracks over every run of spaces from every start
    position, quadratic in a prompt of many spaces; this is linear."""
    if "BREAK" not in text:
        return [text]
    parts: list[str] = []
    last = 0
    for m in _BREAK_WORD.finditer(text):
        piece = text[last:m.start()]
        parts.append((piece.lstrip() if parts else piece).rstrip())
        last = m.end()
    rest = text[last:]
    parts.append(rest.lstrip() if parts else rest)
    return parts


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _repeated(factor: float) -> Callable[[float, int], float]:
    """w -> w * factor applied k times one after another (A1111's rounding), cached per starting weight."""
    chains: dict[object, list[float]] = {}

    def apply(weight: float, k: int) -> float:
        chain = chains.setdefault(weight if weight == weight else "nan", [weight])
        while len(chain) <= k:
            chain.append(chain[-1] * factor)
        return chain[k]

    return apply


def parse_attention(text: str) -> list[list]:
    """A1111's `parse_prompt_attention`: a list of `[text, weight]` pairs (BREAK as `["BREAK", -1]`).

    Same results, but linear for long prompts: text appended with no bracket between is joined at once (A1111
    joins it at the end, as it always gets equal weights), and brackets left open at the end are applied with a
    cached chain of multiplications instead of one pass over the prompt per bracket."""
    out: list[list] = []
    round_open: list[int] = []   # index into `out` where each open bracket's range starts
    square_open: list[int] = []
    fresh = False  # out[-1] was appended after the last bracket and still has weight 1

    def scale(start: int, factor: float) -> None:
        nonlocal fresh
        fresh = False
        for item in out[start:]:
            item[1] *= factor

    def add(piece: str) -> None:
        nonlocal fresh
        if fresh:
            out[-1][0] += piece
        else:
            out.append([piece, 1.0])
            fresh = True

    def add_text(piece: str) -> None:
        nonlocal fresh
        for i, part in enumerate(split_break(piece)):
            if i:
                out.append(["BREAK", -1])
                fresh = False
            add(part)

    for m in _TOKENS.finditer(text):
        kind = m.lastgroup if m.lastgroup != "number" else "weighted"
        token = m.group(0)
        if kind == "escaped":
            add(token[1:])
        elif kind == "backslash":
            add("")
        elif kind == "open":
            (round_open if token == "(" else square_open).append(len(out))
            fresh = False
        elif kind == "weighted" and round_open:
            weight = _float(m.group("number"))
            if weight is None:  # A1111 raises here; keep ':number' as text and close the group as plain ( )
                add_text(token[:-1])
                scale(round_open.pop(), ROUND)
            else:
                scale(round_open.pop(), weight)
        elif kind == "close" and token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif kind == "close" and token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:  # text, a colon, or a closing bracket / ':w)' with nothing open
            add_text(token)

    # brackets never closed: round ones first, then square ones, each over the rest of the prompt
    for opened, factor in ((round_open, ROUND), (square_open, SQUARE)):
        if not opened:
            continue
        times, k, apply = [0] * len(out), 0, _repeated(factor)
        for i in range(len(out)):
            while k < len(opened) and opened[k] <= i:
                k += 1
            times[i] = k
        for item, count in zip(out, times):
            if count:
                item[1] = apply(item[1], count)
    if not out:
        return [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def attention_fragments(text: str) -> tuple[Fragment, ...]:
    """`parse_attention` as encoder input: weights cleaned (finite, clamped), BREAK markers as breaks.

    A1111 only breaks on a BREAK whose weight is exactly -1, so inside brackets (`(a BREAK b)`, weight -1.1) it
    encodes the word "BREAK" instead; here every BREAK that `parse_attention` found is a break."""
    frags = []
    for piece, weight in parse_attention(text):
        if piece == "BREAK" and weight < 0:
            frags.append(BREAK)
        else:
            frags.append(Fragment(piece, clean_weight(weight)))
    return merge(frags)
