"""compel / InvokeAI prompts as sdtune's encoder input (the grammar itself is in `compel_grammar.py`).

compel's structure maps onto sdtune's like this (docs/prompts.md has the full table):

- one prompt -> a tuple of `Fragment`s with compel's texts and weights (cleaned for the encoder: NaN -> 1, clamped
  to [0, 100], so `a` followed by thousands of `+` signs is weight 100, never an overflow);
- `.blend(w...)` -> a `Blend` whose weights are divided by their sum, as compel does; where the sum is (nearly)
  zero, by the sum of absolute values instead (compel would divide by zero); `no_normalize` keeps them as given;
- `.and(w...)` / `.add(w...)` -> the prompts one after another, each starting a new 75-token chunk (compel
  concatenates their conditionings along the token axis), each prompt's token weights multiplied by its weight;
- `withLora(name[, w])` / `useLora(...)` -> `<lora:name:w>` tags, taken out of the text by
  `extract_extra_networks` and loaded by the generator's LoRA extra network; here they are only removed;
- `.swap()` (cross-attention control, "prompt-to-prompt") -> a one-line SdtuneError: sdtune has no cross-attention
  control, and reading it as text would silently give another image.
"""

from __future__ import annotations

import math
import re

from sdtune.errors import SdtuneError
from sdtune.prompts.compel_grammar import parse_structure
from sdtune.prompts.compel_nodes import CBlend, CConjunction, CFragment, CSwap
from sdtune.prompts.extra_networks import extract_compel_loras
from sdtune.prompts.fragments import BREAK, Blend, Conditioning, Fragment, clean_weight

_LORA_LEFT = re.compile(r"(?<![A-Za-z0-9_])(?:withLora|useLora)\s*\(")
_SWAP_ERROR = ("compel's .swap() (cross-attention control) is not supported; use A1111 prompt editing "
               "[from:to:when] with --prompt-syntax a1111 instead")


def compel_structure(text: str) -> CConjunction:
    """compel's own parse of `text`: conjunction -> blends / prompts -> fragments and swaps, with its LoRAs."""
    body, networks = extract_compel_loras(text)
    left = _LORA_LEFT.search(body)
    if left:
        raise SdtuneError(f"cannot read {body[left.start():left.start() + 40]!r}: write withLora(name) or "
                          f"withLora(name, weight), e.g. withLora(ink, 0.8)")
    return parse_structure(body, tuple((n.name, n.weight) for n in networks))


def _check_no_swap(prompt: tuple) -> None:
    if any(isinstance(x, CSwap) or ".swap(" in x.text for x in prompt):
        raise SdtuneError(_SWAP_ERROR)


def _fragments(prompt: tuple, factor: float = 1.0) -> list[Fragment]:
    """compel fragments -> sdtune Fragments (weights cleaned); equal neighbours joined with a space, as compel."""
    _check_no_swap(prompt)
    out: list[Fragment] = []
    for f in prompt:
        assert isinstance(f, CFragment)
        w = clean_weight(f.weight * factor)
        if out and out[-1].weight == w:
            out[-1] = Fragment(out[-1].text + " " + f.text, w)
        else:
            out.append(Fragment(f.text, w))
    return [f for f in out if f.text.strip()]


def blend_weights(weights: list[float], count: int, normalize: bool = True) -> list[float]:
    """Blend weights for `count` prompts: missing ones are 1; not finite -> 1; divided by their sum (or, when that
    is nearly zero, by the sum of absolute values; all zero: equal) unless `normalize` is off. Always finite."""
    ws = [w if math.isfinite(w) and abs(w) < 1e30 else 1.0 for w in (weights + [1.0] * count)[:count]]
    if not normalize:
        return ws
    total = sum(ws)
    if abs(total) < 1e-6:
        total = sum(abs(w) for w in ws)
    if total < 1e-12:
        return [1.0 / count] * count
    return [w / total for w in ws]


def to_conditioning(structure: CConjunction) -> Conditioning:
    """sdtune's encoder input for compel's structure (rules in the module doc)."""
    parts = structure.prompts
    if len(parts) == 1 and isinstance(parts[0], CBlend):
        blend = parts[0]
        weights = blend_weights(list(blend.weights), len(blend.prompts), blend.normalize)
        return Blend(tuple((tuple(_fragments(p)) or (Fragment(""),), w) for p, w in zip(blend.prompts, weights)))
    frags: list[Fragment] = []
    for k, (prompt, weight) in enumerate(zip(parts, structure.weights)):
        frags += ([BREAK] if k else []) + _fragments(prompt, weight)
    return tuple(frags) or (Fragment(""),)


def parse_compel(text: str) -> Conditioning:
    """A compel prompt as encoder input: a tuple of Fragments (BREAK between `.and()` parts), or a Blend.
    Raises a one-line SdtuneError for `.swap()`, malformed `withLora(`, and calls compel itself rejects."""
    return to_conditioning(compel_structure(text))


def parse_compel_weights(text: str) -> list[list]:
    """A plain compel prompt (no blend, no `.and()` of several prompts) as compel's `[text, weight]` pairs, raw
    weights (neighbours of equal weight joined with a space)."""
    structure = compel_structure(text)
    if len(structure.prompts) > 1 or any(isinstance(p, CBlend) for p in structure.prompts):
        raise SdtuneError("this compel prompt is a .blend() or .and() of several prompts; use parse_compel")
    prompt = structure.prompts[0] if structure.prompts else (CFragment(""),)
    _check_no_swap(prompt)
    return [[f.text, f.weight * structure.weights[0] if structure.weights else f.weight] for f in prompt]
