"""Extra-network tags: `<lora:name:weight>`, `<lyco:name:weight>`, `<hypernet:name:weight>`.

As in A1111, every `<word:...>` tag is taken out of the prompt text (before anything else is parsed) and returned
on its own: the arguments are split at `:`, the first is the name, the second the weight (1.0 when absent or not a
finite number), the rest is kept as is. Kinds other than lora, lyco and hypernet are returned too (A1111 warns
about them); `known` tells them apart. Applying the networks is not the prompt layer's job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KNOWN = ("lora", "lyco", "hypernet")
_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetwork:
    kind: str
    name: str
    weight: float = 1.0
    args: tuple[str, ...] = ()

    @property
    def known(self) -> bool:
        return self.kind in KNOWN


def _weight(text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        return 1.0
    return w if math.isfinite(w) else 1.0


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetwork]]:
    """(the prompt without tags, the tags in order)."""
    found: list[ExtraNetwork] = []

    def take(m: re.Match) -> str:
        items = m.group(2).split(":")
        weight = _weight(items[1]) if len(items) > 1 else 1.0
        found.append(ExtraNetwork(m.group(1), items[0], weight, tuple(items[2:])))
        return ""

    end = text.rfind(">") + 1  # no tag can end after the last '>' (keeps the search linear on odd input)
    return _TAG.sub(take, text[:end]) + text[end:], found
