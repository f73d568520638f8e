"""Training methods: one plug-in per method for the shared loop (`training.loop`).

`METHODS` maps a method's name to its class; the CLI makes one `sdtune train <name>` command per entry (options
from the class's `Options` dataclass). Register a new method with `register_method(cls)`."""

from __future__ import annotations

from sdtune.errors import SdtuneError
from sdtune.training.methods.base import Batch, Diverged, TrainingMethod, UNetConditioning, trainable
from sdtune.training.methods.bias import UNetBiasMethod
from sdtune.training.methods.hypernetwork import HypernetworkMethod
from sdtune.training.methods.dreambooth import DreamBoothMethod
from sdtune.training.methods.lora import LoraMethod
from sdtune.training.methods.textual_inversion import TextualInversionMethod

METHODS: dict[str, type[TrainingMethod]] = {}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    """Add a method class to `METHODS` under `cls.name` (usable as a class decorator)."""
    if not cls.name or not cls.name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method class {cls.__name__} needs a simple `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[TrainingMethod]:
    if name not in METHODS:
        raise SdtuneError(f"unknown training method {name!r}; use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


register_method(LoraMethod)
register_method(UNetBiasMethod)
register_method(DreamBoothMethod)
register_method(TextualInversionMethod)
register_method(HypernetworkMethod)

__all__ = ["METHODS", "Batch", "Diverged", "DreamBoothMethod", "LoraMethod", "TextualInversionMethod",
           "TrainingMethod", "UNetBiasMethod", "UNetConditioning", "get_method", "register_method", "trainable"]
