"""LoRAs as a generation extra network: `--lora FILE[:W]` files that stay on, plus the `<lora:name:weight>` tags of
each prompt (A1111's behaviour).

The tags are looked up in `dirs` (`--lora-dir`, repeatable) and then in the folders of the fixed files; the fixed
LoRAs plus the tagged ones become exactly the active set (`PipelineLoras.set`). Files load once and are kept, so
LoRAs switch on, off and change weight between images without reloading the model. The same file in a tag and in
--lora: the weights add up (as two A1111 tags). The prompt keeps its tags, so the infotext reads like A1111's, plus
`Lora hashes`. Tags in the negative prompt are not applied (A1111 ignores them too); a warning says so.

`--negative-lora FILE[:W]` files (`set_negative`) are active only in the unconditional pass: the Generator runs that
pass inside `negative_pass()` (see `generate.negative_pass`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from sdtune.adapters.lora.apply import LoraSpec, PipelineLoras, parse_lora_specs
from sdtune.adapters.lora.tags import LORA_TAGS, lora_hashes_value, resolve_lora_tags
from sdtune.adapters.tags import prompt_tags
from sdtune.prompts.embeddings import EmbeddingRegistry

log = logging.getLogger(__name__)


class LoraExtraNetwork:
    """The LoRAs of one Generator's base model (an `ExtraNetwork`)."""

    kind = "lora"

    def __init__(self, model: Any, dirs: Any = None,
                 embedding_registry: Callable[[], EmbeddingRegistry] | None = None) -> None:
        self.model = model
        self.dirs: list[str | Path] = list(dirs or [])
        self.fixed: list[LoraSpec] = []
        self.negative: list[tuple[Any, float]] = []  # --negative-lora: the unconditional pass only
        self._specs: list[LoraSpec] = []  # what is active in the conditional pass now
        self.stack: PipelineLoras | None = None  # created on first use: no LoRA, no PEFT layers
        self._tagged = False
        # where embeddings bundled in LoRA files are registered while their LoRA is active (A1111's behaviour)
        self.embedding_registry = embedding_registry
        self._bundled: dict[str, int] = {}  # name -> id of the vectors registered under it

    def set_fixed(self, loras: Any) -> list[Any]:
        """LoRAs used for every image: [(path, weight), ...] or paths (weight 1); [] = none."""
        self.fixed = list(loras or [])
        self._specs = list(self.fixed)
        if self.stack is None and not self.fixed:
            return []
        active = self._stack().set(self.fixed)
        self._sync_bundled()
        return active

    def _stack(self) -> PipelineLoras:
        if self.stack is None:
            self.stack = PipelineLoras.for_pipeline(self.model)
        return self.stack

    def search_dirs(self) -> list[Path]:
        """The --lora-dir folders first, then the folders of the fixed files (deduplicated, in order)."""
        dirs: list[Path] = [Path(d).expanduser() for d in self.dirs]
        dirs += [Path(src).expanduser().parent for src, _ in parse_lora_specs(self.fixed) if isinstance(src, (str, Path))]
        return list(dict.fromkeys(dirs))

    def activate(self, prompt: str, negative_prompt: str = "") -> None:
        tags = prompt_tags(LORA_TAGS, prompt)
        neg = prompt_tags(LORA_TAGS, negative_prompt)
        if neg:
            log.warning("LoRA tags in the negative prompt are not applied (as in A1111): %s",
                        ", ".join(f"<{n.kind}:{n.name}:{n.weight:g}>" for n in neg))
        if not tags and not self._tagged:
            return  # nothing from prompts now or before: the fixed LoRAs stay as set_fixed left them
        specs = self.fixed + (resolve_lora_tags(tags, self.search_dirs()) if tags else [])
        if self.stack is None and not specs:
            self._tagged = False
            return
        self._stack().set(specs)
        self._specs = specs
        self._tagged = bool(tags)
        self._sync_bundled()

    def _sync_bundled(self) -> None:
        """Embeddings bundled in the active LoRA files usable by name; those of inactive ones removed."""
        active = {name: vecs for lora, w in (self.stack.active if self.stack else []) if w
                  for name, vecs in lora.embeddings.items()}
        if not active and not self._bundled:
            return
        if self.embedding_registry is None:
            log.warning("embeddings bundled in the LoRA (%s) are not used: this generator has no embeddings",
                        ", ".join(sorted(active)))
            return
        registry = self.embedding_registry()
        for name in [n for n in self._bundled if self._bundled[n] != id(active.get(n))]:
            registry.remove(name)
            del self._bundled[name]
        for name, vecs in active.items():
            if name in self._bundled:
                continue
            if name in registry:
                log.warning("embedding %r bundled in a LoRA is not used: an embedding of that name is loaded", name)
                continue
            registry.add(name, dict(vecs))
            self._bundled[name] = id(vecs)

    def set_negative(self, loras: Any) -> list[Any]:
        """LoRAs active in the unconditional (negative) pass only, for every image: [(path, weight), ...] or paths;
        [] = none. Loaded (and checked against the model) now, inactive until a run's negative pass."""
        self.negative = parse_lora_specs(loras)
        if not self.negative:
            return []
        stack = self._stack()
        return [(stack.load(src), w) for src, w in self.negative]

    def negative_touches(self, component: str) -> bool:
        """Whether a negative LoRA has layers in `component` ("unet", "text_encoder", ...)."""
        if not self.negative or self.stack is None:
            return False
        stack = self.stack
        return any(component in stack.load(src).components for src, _ in self.negative)

    @contextmanager
    def negative_pass(self) -> Iterator[None]:
        """The conditional pass's LoRAs plus the negative ones while inside; back to the former after."""
        stack = self._stack()
        stack.set(list(self._specs) + list(self.negative))
        try:
            yield
        finally:
            stack.set(self._specs)

    def deactivate(self) -> None:
        self._specs = []
        if self.stack is not None:
            self.stack.clear()
        self._tagged = True  # the next activate sets the fixed LoRAs again
        self._sync_bundled()

    def infotext_fields(self) -> list[tuple[str, str]]:
        value = lora_hashes_value(self.stack.infotext_entries()) if self.stack is not None else None
        fields = [("Lora hashes", value)] if value else []
        if self.negative and self.stack is not None:
            loaded = [(self.stack.load(src), w) for src, w in self.negative]
            fields.append(("Negative LoRA", ", ".join(f"{lora.name}:{w:g}" for lora, w in loaded)))
            hashes = lora_hashes_value((lora.name, lora.hash) for lora, w in loaded if w != 0 and lora.hash)
            if hashes:
                fields.append(("Negative Lora hashes", hashes))
        return fields
