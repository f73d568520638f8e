"""`FILE[:WEIGHT]` command-line values, shared by every adapter option (--lora, --hypernetwork, ...)."""

from __future__ import annotations

from pathlib import Path

from sdtune.errors import SdtuneError


def parse_file_weight(text: str, option: str, what: str = "weight") -> tuple[str, float]:
    """`FILE[:WEIGHT]` -> (FILE, weight); the weight defaults to 1 (a `C:\\...` drive letter is not a weight).

    A tail that is not a number is part of the file name, unless FILE exists and FILE:TAIL does not: then the
    weight is wrong, and the error says so instead of "no such file"."""
    path, sep, tail = str(text).rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            if not Path(text).expanduser().exists() and Path(path).expanduser().is_file():
                raise SdtuneError(f"{option} {text}: the {what} {tail!r} is not a number; "
                                  f"use {path}:0.8 (or {path} for 1)") from None
            return str(text), 1.0  # a file whose name has a colon, or a missing one (the caller says so)
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise SdtuneError(f"{option} {text}: the {what} must be a finite number")
        return path, weight
    return str(text), 1.0
