"""Textual Inversion embeddings as a generation extra network: an `EmbeddingLibrary` watching folders and files.

An embedding acts only where a prompt names it (the prompt encoder looks names up in the library's registry), so
`activate` only picks up files added, changed or removed since the last image, and `deactivate` has nothing to undo.
"""

from __future__ import annotations

from sdtune.adapters.textual_inversion.library import EmbeddingLibrary


class EmbeddingExtraNetwork:
    """The embeddings usable by name in one Generator's prompts (an `ExtraNetwork`)."""

    kind = "embedding"

    def __init__(self, library: EmbeddingLibrary) -> None:
        self.library = library

    def activate(self, prompt: str, negative_prompt: str = "") -> None:
        self.library.refresh()

    def deactivate(self) -> None:
        """Nothing to undo: a prompt that names no embedding encodes exactly as the base model's."""

    def infotext_fields(self) -> list[tuple[str, str]]:
        return []
