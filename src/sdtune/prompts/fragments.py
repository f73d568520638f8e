"""The parsed form that every prompt syntax produces: weighted text fragments, BREAKs and blends.

A conditioning text is either a tuple of `Fragment`s (A1111 or compel emphasis, with BREAKs) or a `Blend` of such
tuples (compel's `.blend()`). The encoder only sees this form, never the syntax it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

# Token weights reaching the encoder are finite and clamped to this range. A1111 itself passes any float on
# (`(x:-1)`, `(x:1000000)`, `((((...))))` nested 10,000 deep = inf); those would only give NaN or noise.
MIN_WEIGHT = 0.0
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class Fragment:
    """Text with one weight. `is_break` marks a BREAK: the current 75-token chunk ends there (text is "")."""

    text: str
    weight: float = 1.0
    is_break: bool = False


BREAK = Fragment("", 1.0, True)
Fragments = tuple  # tuple[Fragment, ...]


@dataclass(frozen=True)
class Blend:
    """compel's `("a", "b").blend(wa, wb)`: each part is encoded on its own and the results are summed with these
    (already normalised) weights."""

    parts: tuple  # tuple[tuple[tuple[Fragment, ...], float], ...]


Conditioning = Union[tuple, Blend]


def clean_weight(weight: float) -> float:
    """A weight the encoder can use: NaN -> 1, otherwise clamped to [MIN_WEIGHT, MAX_WEIGHT]."""
    if weight != weight:  # NaN
        return 1.0
    return min(MAX_WEIGHT, max(MIN_WEIGHT, weight))


def merge(fragments: list[Fragment]) -> tuple[Fragment, ...]:
    """Join neighbours of equal weight (never across a BREAK); drop empty text. At least one fragment is kept."""
    out: list[Fragment] = []
    for f in fragments:
        if not f.is_break and not f.text:
            continue
        if out and not f.is_break and not out[-1].is_break and out[-1].weight == f.weight:
            out[-1] = Fragment(out[-1].text + f.text, f.weight)
        else:
            out.append(f)
    return tuple(out) or (Fragment(""),)


def plain_text(cond: Conditioning) -> str:
    """The text without syntax (BREAK as a space, blend parts joined by ' | '), e.g. for explaining."""
    if isinstance(cond, Blend):
        return " | ".join(plain_text(p) for p, _ in cond.parts)
    return "".join(" " if f.is_break else f.text for f in cond)

