"""Hypernetworks as a generation extra network: `--hypernetwork FILE[:S]` files, chained in order as in A1111,
then the `<hypernet:name:strength>` tags of the prompt (looked up in `dirs`; A1111 reads them from the positive
prompt). Files load once (`PipelineHypernetworks`); strength 0 or none active gives the base model's exact images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.adapters.hypernetwork.apply import PipelineHypernetworks, parse_hypernetwork_specs
from sdtune.adapters.hypernetwork.tags import HYPERNET_TAGS, resolve_hypernet_tags
from sdtune.adapters.tags import prompt_tags


class HypernetworkExtraNetwork:
    """The hypernetworks of one Generator's base model (an `ExtraNetwork`)."""

    kind = "hypernet"

    def __init__(self, model: Any, dirs: Any = None) -> None:
        self.model = model
        self.dirs: list[str | Path] = list(dirs or [])
        self.fixed: list[tuple[Any, float]] = []
        self.stack: PipelineHypernetworks | None = None  # created on first use: no processors are wrapped before

    def set_fixed(self, specs: Any, dirs: Any = None) -> None:
        """Hypernetworks for every image: [(path, strength), ...] or paths; loaded and checked now, so a bad file
        fails before any image is made."""
        self.fixed = parse_hypernetwork_specs(specs)
        if dirs is not None:
            self.dirs = list(dirs)
        if self.fixed:
            self._stack().set(self.fixed)

    def _stack(self) -> PipelineHypernetworks:
        if self.stack is None:
            self.stack = PipelineHypernetworks.for_pipeline(self.model)
        return self.stack

    def activate(self, prompt: str, negative_prompt: str = "") -> None:
        tags = prompt_tags(HYPERNET_TAGS, prompt)
        if self.stack is None:
            self.stack = PipelineHypernetworks.existing(self.model)  # another user of the pipeline set some
        if not self.fixed and not tags and self.stack is None:
            return  # never used on this pipeline: nothing is touched
        specs = self.fixed + (resolve_hypernet_tags(tags, self.dirs) if tags else [])
        self._stack().set(specs)

    def deactivate(self) -> None:
        if self.stack is not None:
            self.stack.clear()

    def infotext_fields(self) -> list[tuple[str, str]]:
        """A1111's `Hypernet`, `Hypernet hash`, `Hypernet strength` for the fixed hypernetworks (several:
        comma-separated, in order). Prompt tags need none: they stay in the prompt text."""
        if not self.fixed or self.stack is None:
            return []
        used = [(e, s) for e, s in self.stack.active[:len(self.fixed)] if s != 0]
        if not used:
            return []
        fields = [("Hypernet", ", ".join(e.name.replace(",", "") for e, _ in used))]
        if all(e.hash for e, _ in used):
            fields.append(("Hypernet hash", ", ".join(str(e.hash) for e, _ in used)))
        fields.append(("Hypernet strength", ", ".join(f"{s:g}" for _, s in used)))
        return fields
