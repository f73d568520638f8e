"""Extra-network tags: `<lora:name:weight>`, `<lyco:name:weight>`, `<hypernet:name:weight>`.

As in A1111, every `<word:...>` tag is taken out of the prompt text (before anything else is parsed) and returned
on its own: the arguments are split at `:`, the first is the name, the second the weight (1.0 when absent or not a
finite number), the rest is kept as is. Kinds other than lora, lyco and hypernet are returned too (A1111 warns
about them); `known` tells them apart. Applying the networks is not the prompt layer's job.

compel's `withLora(name)` / `withLora(name, weight)` / `useLora(...)` are taken out the same way, in any syntax,
and become `ExtraNetwork("lora", name, weight)`: the LoRA extra network then loads them exactly like
`<lora:name:weight>` (one route, so the two spellings cannot drift apart). The weight is compel's number
(`0.5`, `-1`, `.5`); the name is compel's word (letters, digits, `_`, `-`) or any other run without spaces,
commas, brackets, quotes or `<>` (so `styles/ink` and `ink.v2` work too). As in compel the call must start a
word (at the start, or after a space, `(` or `"`): `xwithLora(a)` is text.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field

KNOWN = ("lora", "lyco", "hypernet")
_TAG = re.compile(r"<(\w+):([^>]+)>")
_LORA_CALL = re.compile(r"(?<![^\s(\"])(?:withLora|useLora)\s*\(\s*([^\s,()\"<>]+)\s*"
                        r"(?:,\s*([+-]?(?:\d+\.\d*|\.\d+)|-?\d+)\s*)?\)")


@dataclass(frozen=True)
class ExtraNetwork:
    kind: str
    name: str
    weight: float = 1.0
    args: tuple[str, ...] = ()    # the arguments after the weight, as written
    weight_text: str = field(default="", compare=False)  # the weight as written (a named `te=0.5` reads as 1.0)

    @property
    def known(self) -> bool:
        return self.kind in KNOWN


def finite_number(text: str) -> float | None:
    """`text` as a finite float, else None (the one reading of a tag's numbers: here and `adapters.lora.tags`)."""
    try:
        w = float(text.strip())
    except ValueError:
        return None
    return w if math.isfinite(w) else None


def _weight(text: str) -> float:
    w = finite_number(text)
    return 1.0 if w is None else w


def _spans(text: str, tags: bool, calls: bool) -> list[tuple[int, int, ExtraNetwork]]:
    found = []
    if tags:
        end = text.rfind(">") + 1  # no tag can end after the last '>' (keeps the search linear on odd input)
        for m in _TAG.finditer(text, 0, end):
            items = m.group(2).split(":")
            weight = _weight(items[1]) if len(items) > 1 else 1.0
            found.append((m.start(), m.end(), ExtraNetwork(m.group(1), items[0], weight, tuple(items[2:]),
                                                            items[1] if len(items) > 1 else "")))
    if calls:
        starts = [a for a, _, _ in found]
        for m in _LORA_CALL.finditer(text):
            k = bisect.bisect_right(starts, m.start()) - 1
            inside = (k >= 0 and found[k][1] > m.start()) or (k + 1 < len(starts) and starts[k + 1] < m.end())
            if not inside:
                w = _weight(m.group(2)) if m.group(2) else 1.0
                found.append((m.start(), m.end(), ExtraNetwork("lora", m.group(1), w)))
    return sorted(found, key=lambda x: x[0])


def _take(text: str, spans: list[tuple[int, int, ExtraNetwork]]) -> tuple[str, list[ExtraNetwork]]:
    pieces, pos = [], 0
    for a, b, _ in spans:
        pieces.append(text[pos:a])
        pos = b
    return "".join(pieces) + text[pos:], [n for _, _, n in spans]


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetwork]]:
    """(the prompt without tags and withLora/useLora calls, the networks in prompt order)."""
    return _take(text, _spans(text, True, True))


def extract_compel_loras(text: str) -> tuple[str, list[ExtraNetwork]]:
    """(the prompt without withLora/useLora calls, their networks); `<...>` tags are left alone."""
    return _take(text, _spans(text, False, True))
