"""Textual Inversion: embedding files in every common layout (`files`), folders of embeddings kept loaded and up to
date while a model stays loaded (`library`), conversion (`convert`). Training is the `ti` method of the shared loop
(`sdtune.training.methods.textual_inversion`)."""

from sdtune.adapters.textual_inversion.files import FORMATS, Embedding, read_embedding, write_embedding
from sdtune.adapters.textual_inversion.library import EmbeddingLibrary

__all__ = ["FORMATS", "Embedding", "EmbeddingLibrary", "read_embedding", "write_embedding"]
