"""The one seam between generation and extra networks: what A1111 calls the files loaded beside a model and
switched per prompt (Textual Inversion embeddings, LoRAs, hypernetworks).

A `Generator` holds a list of `ExtraNetwork`s (`Generator.extra_networks`). For every run it calls
`activate(prompt, negative_prompt)` on each, in list order, before the prompt is encoded: the network makes the
model do what its fixed settings plus the prompt's tags ask for (`<lora:name:w>`, `<hypernet:name:s>`, an
embedding's name). Each image's infotext then gets every network's `infotext_fields()` (A1111's `Lora hashes`,
`Hypernet`, ...). `deactivate()` returns the model to its base behaviour, bit-identical, with files kept loaded.

A new kind of extra network (LoHa, a ControlNet-like add-on, ...) implements this protocol and is appended to
`Generator.extra_networks`; nothing in the Generator changes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ExtraNetwork(Protocol):
    """An extra network as the Generator sees it (see the module docstring)."""

    kind: str  # "embedding", "lora", "hypernet": A1111's extra-network page names

    def activate(self, prompt: str, negative_prompt: str) -> None:
        """Apply the fixed settings and this prompt's tags for the next images (raise SdtuneError on a bad tag)."""
        ...

    def deactivate(self) -> None:
        """Back to the base model's exact outputs; loaded files stay loaded."""
        ...

    def infotext_fields(self) -> list[tuple[str, str]]:
        """(A1111 infotext key, value) pairs describing what the last `activate` made active."""
        ...
