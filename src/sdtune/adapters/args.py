"""`FILE[:WEIGHT]` command-line values, shared by every adapter option (--lora, --hypernetwork, ...)."""

from __future__ import annotations

from sdtune.errors import SdtuneError


def parse_file_weight(text: str, option: str, what: str = "weight") -> tuple[str, float]:
    """`FILE[:WEIGHT]` -> (FILE, weight); the weight defaults to 1 (a `C:\\...` drive letter is not a weight)."""
    path, sep, tail = str(text).rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            return str(text), 1.0
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise SdtuneError(f"{option} {text}: the {what} must be a finite number")
        return path, weight
    return str(text), 1.0
