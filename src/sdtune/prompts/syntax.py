"""Which weighting syntax a prompt is written in: `a1111` or `compel`.

`--prompt-syntax auto` (the default) picks compel when the prompt has a compel marker and no A1111 weight; else
A1111. Compel markers: a word directly followed by `+` signs (`ball++`), a closing `)` or `"` directly followed by
a number or by `+`/`-` signs (`(a cat)1.3`, `(red)--`), a compel call `.blend(` / `.and(` / `.add(` / `.attend(` /
`.swap(`, or a `withLora(` / `useLora(` left after the well-formed ones were taken out as LoRA tags (so a malformed
one, like `.swap(`, gets compel's clear error instead of being read as A1111 text). An A1111 weight is `:number)`,
as in `(cat:1.2)`. A prompt with neither (plain text, `(x)`, `[x]`, prompt editing) is A1111.
"""

from __future__ import annotations

import re

from sdtune.errors import SdtuneError

SYNTAXES = ("auto", "a1111", "compel")
_COMPEL = re.compile(r"""\w\++(?=[\s,.;:!?)"]|$)|[)"](?:\++|-+|\d*\.?\d+)|\.(?:blend|and|add|attend|swap)\("""
                     r"""|(?<![A-Za-z0-9_])(?:withLora|useLora)\s*\(""")
_A1111_WEIGHT = re.compile(r":\s*[+-]?[.\d]+\s*\)")


def detect_syntax(text: str) -> str:
    """'compel' or 'a1111' by the rule in the module doc."""
    if _COMPEL.search(text) and not _A1111_WEIGHT.search(text):
        return "compel"
    return "a1111"


def resolve_syntax(text: str, syntax: str = "auto") -> str:
    if syntax not in SYNTAXES:
        raise SdtuneError(f"unknown prompt syntax {syntax!r}; use one of {', '.join(SYNTAXES)}")
    return detect_syntax(text) if syntax == "auto" else syntax
