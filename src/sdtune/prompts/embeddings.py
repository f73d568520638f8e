"""`EmbeddingRegistry`: textual-inversion vectors looked up by name inside prompts.

An embedding is n vectors per text encoder, keyed by encoder: "clip_l" (SD1, and SDXL's first encoder), "clip_h"
(SD2), "clip_g" (SDXL's second encoder), e.g. `{"clip_l": Tensor[n, 768], "clip_g": Tensor[n, 1280]}`. A bare
tensor `[n, width]` (an A1111 SD1/SD2 embedding) serves any encoder of that width. When an encoder's key is
missing, a tensor of the encoder's width is used if there is exactly one.

A name matches as a whole word in the prompt text (not inside a longer word), case-sensitively, as in A1111;
longer names win over shorter ones they contain. The encoder splices the vectors in place of the name's tokens;
neither the tokenizer nor the model is changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from sdtune.errors import SdtuneError

ENCODER_KEYS = ("clip_l", "clip_h", "clip_g")
MAX_VECTORS = 75  # one 75-token chunk: an embedding never splits across chunks


class EmbeddingRegistry:
    def __init__(self, embeddings: Mapping[str, Any] | None = None) -> None:
        self._items: dict[str, dict[str, Any]] = {}
        self._pattern: re.Pattern | None = None
        for name, vectors in (embeddings or {}).items():
            self.add(name, vectors)

    def add(self, name: str, vectors: Any) -> None:
        """Register `name` (replacing an existing one) with a tensor [n, width] or {encoder key: tensor}."""
        import torch

        # "<star>" is allowed (diffusers-style tokens); ":" is not, so extra-network tags <kind:name> never match.
        # Spaces are allowed: A1111 names an embedding by its file stem, "my style.pt" is used as "my style".
        if not isinstance(name, str) or not name.strip() or name != name.strip() or "\n" in name \
                or re.search(r"[()\[\]:|\\]", name):
            raise SdtuneError(f"embedding name {name!r} must be text without ()[]:|\\ characters or line breaks")
        table = dict(vectors) if isinstance(vectors, Mapping) else {"*": vectors}
        if not table:
            raise SdtuneError(f"embedding {name!r} has no vectors")
        counts = set()
        clean = {}
        for key, t in table.items():
            if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2) or not t.is_floating_point():
                raise SdtuneError(f"embedding {name!r}: vectors for {key!r} must be a float tensor [n, width]")
            t = t.detach().reshape(1, -1) if t.ndim == 1 else t.detach()
            if not torch.isfinite(t).all():
                raise SdtuneError(f"embedding {name!r}: vectors for {key!r} contain NaN or infinity")
            counts.add(t.shape[0])
            clean[key] = t
        if len(counts) != 1 or not 1 <= min(counts) <= MAX_VECTORS:
            raise SdtuneError(f"embedding {name!r} must have the same number of vectors (1..{MAX_VECTORS}) for "
                              f"every encoder; got {sorted(counts)}")
        self._items[name] = clean
        self._pattern = None

    def remove(self, name: str) -> None:
        self._items.pop(name, None)
        self._pattern = None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def num_vectors(self, name: str) -> int:
        return next(iter(self._items[name].values())).shape[0]

    def vectors(self, name: str, key: str, width: int) -> Any:
        """The [n, width] vectors of `name` for the encoder `key` of that width."""
        table = self._items[name]
        t = table.get(key)
        if t is None:
            fits = [v for v in table.values() if v.shape[1] == width]
            t = fits[0] if len(fits) == 1 else None
        if t is None or t.shape[1] != width:
            have = ", ".join(f"{k}: width {v.shape[1]}" for k, v in table.items())
            raise SdtuneError(f"embedding {name!r} has no vectors for the {key} text encoder (width {width}); it "
                              f"has {have}. Use an embedding made for this model family")
        return t

    def split(self, text: str) -> list[str]:
        """`text` cut at embedding names: even positions are text, odd ones are names (possibly empty text)."""
        if not self._items:
            return [text]
        if self._pattern is None:
            names = sorted(self._items, key=len, reverse=True)
            self._pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, names)) + r")(?!\w)")
        return self._pattern.split(text)
