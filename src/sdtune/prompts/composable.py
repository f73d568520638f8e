"""A1111's composable diffusion: `a cat AND a dog :0.5`.

Each sub-prompt is its own conditioning; the sampler combines them as
`uncond + cfg * sum_i w_i * (cond_i - uncond)`. The prompt is split at every whole word `AND` (upper case); a
sub-prompt ending in `:number` (optionally with spaces) has that weight, otherwise 1. Trailing spaces are dropped.
As in A1111 this applies even without AND: `a photo of a cat :0.5` is one sub-prompt of weight 0.5, and the
negative prompt is never split.
"""

from __future__ import annotations

import math
import re

_AND = re.compile(r"\bAND\b")
# A1111 reads a sub-prompt with `^((?:\s|.)*?)(?:\s*:\s*(number))?\s*$`; that lazy pattern backtracks over
# whitespace quadratically, so the same split is done here by stripping and one anchored search (linear)
_TAIL_WEIGHT = re.compile(r":\s*([-+]?(?:\d+\.?|\d*\.\d+))$")


def split_and(text: str) -> list[tuple[str, float]]:
    """Sub-prompts and their weights; always at least one. Weights are finite (an overflowing one becomes 1)."""
    parts = []
    for sub in _AND.split(text):
        body, weight = sub.rstrip(), None
        m = _TAIL_WEIGHT.search(body)
        if m:
            body, weight = body[:m.start()].rstrip(), m.group(1)
        w = float(weight) if weight is not None else 1.0
        parts.append((body, w if math.isfinite(w) else 1.0))
    return parts
