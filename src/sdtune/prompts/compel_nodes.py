"""compel's structure (what its parser returns) and the flattening that produces it from the parse tree.

Kept apart from the grammar (`compel_grammar.py`) because tests and `compel.py` only need these types; the
rules are compel's: weights multiply inward, neighbours of equal weight are joined with one space, a swap's empty
side is one empty fragment, and `shape_freedom=f` becomes `s_end = 1 - f ** (1/3)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SWAP_DEFAULTS = {"s_start": 0.0, "s_end": 0.0, "t_start": 0.2, "t_end": 1.0}


@dataclass(frozen=True)
class CFragment:
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class CSwap:
    """`original.swap(edited, option=value...)`: compel's cross-attention control. Options are merged into
    `SWAP_DEFAULTS`; `shape_freedom=f` sets `s_end = 1 - f ** (1/3)` (compel's rule)."""

    original: tuple[CFragment, ...]
    edited: tuple[CFragment, ...]
    options: dict = field(default_factory=lambda: dict(SWAP_DEFAULTS))


CPrompt = tuple  # tuple[Union[CFragment, CSwap], ...]


@dataclass(frozen=True)
class CBlend:
    prompts: tuple  # tuple[CPrompt, ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class CConjunction:
    prompts: tuple  # tuple[Union[CPrompt, CBlend], ...]
    weights: tuple[float, ...]
    loras: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class _Att:
    weight: float
    children: tuple


@dataclass(frozen=True)
class _Swap:
    original: tuple
    edited: tuple
    options: tuple  # option groups, see _Parser.options


Node = CFragment | _Att | _Swap



def unescape(text: str) -> str:
    r"""compel's Fragment: `\(`, `\)` and `\"` are the bare characters; other backslashes stay. compel applies
    this each time it rebuilds a fragment (reading, flattening, joining), so `\\(` ends up as `(`; so do we."""
    return text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')


def flatten(nodes: list | tuple, scale: float) -> list:
    out: list = []
    for node in nodes:
        if isinstance(node, CFragment):
            out.append(CFragment(unescape(node.text), node.weight * scale))
        elif isinstance(node, _Att):
            out += flatten(node.children, scale * node.weight)
        else:
            out.append(CSwap(fuse(flatten(node.original, scale)) or (CFragment(""),),
                             fuse(flatten(node.edited, scale)) or (CFragment(""),), _swap_options(node.options)))
    return out


def fuse(items: list) -> tuple:
    """Neighbouring fragments of equal weight joined with one space (compel's fuse_fragments)."""
    out: list = []
    for x in items:
        if isinstance(x, CFragment) and out and isinstance(out[-1], CFragment) and out[-1].weight == x.weight:
            out[-1] = CFragment(unescape(out[-1].text + " " + x.text), x.weight)
        else:
            out.append(x)
    return tuple(out)


def _swap_options(groups: tuple) -> dict:
    options = dict(SWAP_DEFAULTS)
    given = {g[1]: (g[2] if g[0] == "kv" else "") for g in groups if g[0] != "num"}
    given.update({str(g[1]): "" for g in groups if g[0] == "num"})
    freedom = given.pop("shape_freedom", None)
    if isinstance(freedom, float):
        options["s_end"] = 1.0 - freedom ** (1.0 / 3.0)
    options.update(given)
    return options


