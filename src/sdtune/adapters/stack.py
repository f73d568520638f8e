"""What the adapter stacks of a pipeline (`PipelineLoras`, `PipelineHypernetworks`) share: the Python API's
adapter lists (`path | (path, weight)`) and one stack per pipeline, kept on the pipeline itself so that every
user of the pipeline sees the same active adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from sdtune.errors import SdtuneError

T = TypeVar("T")


def parse_weighted_specs(items: Iterable[Any] | None, direct: type | tuple[type, ...], noun: str,
                what: str = "weight") -> list[tuple[Any, float]]:
    """[path | object | (path | object, weight)] -> [(path | object, weight)]; a bare path or `direct` object has
    weight 1. noun/what name the adapter and its weight in errors ("LoRA", "weight")."""
    out: list[tuple[Any, float]] = []
    for item in items or []:
        if isinstance(item, (str, Path)) or isinstance(item, direct):
            out.append((item, 1.0))
            continue
        try:
            src, weight = item
        except (TypeError, ValueError):
            raise SdtuneError(f"a {noun} is given as a path or (path, {what}), not {item!r}") from None
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise SdtuneError(f"{noun} {what} {weight!r} for {src} is not a number") from None
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise SdtuneError(f"{noun} {what} {weight} for {src} is not a finite number")
        out.append((src, weight))
    return out


def per_pipeline(pipe: Any, attr: str, cls: type[T], make: Callable[[], T]) -> T:
    """The `cls` instance kept on `pipe` as `attr`, made with `make()` on first use: adapter state lives in the
    pipeline's layers, so everything that uses the pipeline must share one stack."""
    existing = getattr(pipe, attr, None)
    if isinstance(existing, cls):
        return existing
    obj = make()
    setattr(pipe, attr, obj)
    return obj
