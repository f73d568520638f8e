"""How a setting is declared and checked: `opt()` fields (section, help, kind, choices) and `coerce`, shared by
`TrainConfig` and every method's `Options` dataclass.

A leaf module: the training methods declare their options with it, and the config schema (`training.config`)
reads the methods' options through the method registry, so neither imports the other in a cycle.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from sdtune.errors import SdtuneError

SECTIONS = ("model", "data", "augment", "optim", "output", "samples", "eval", "log")
KINDS = ("str", "path", "int", "float", "bool", "strs", "ints", "lr", "steps")


def opt(default: Any, help: str, *, section: str, kind: str, choices: Iterable[str] | None = None,
        cli: bool = True, metavar: str | None = None) -> Any:
    """A config field with the metadata the CLI, TOML reader and validation use."""
    assert kind in KINDS, kind
    meta = {"help": help, "section": section, "kind": kind, "choices": tuple(choices) if choices else None,
            "cli": cli, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class NoOptions:
    """A method without settings of its own."""


def unknown_setting(key: str, known: Iterable[str], source: str) -> str:
    """The message for a setting name that does not exist, with the nearest real name."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{source}: unknown setting {key!r}{hint}"


def merge_options(options: Any, values: Mapping[str, Any], *, source: str) -> Any:
    by_name = {f.name: f for f in dataclasses.fields(options)}
    changes = {}
    for key, value in values.items():
        if key not in by_name:
            raise SdtuneError(unknown_setting(key, by_name, source))
        f = by_name[key]
        changes[key] = coerce(key, f.metadata, value, source, nullable=f.default is None)
    return dataclasses.replace(options, **changes)


def coerce(name: str, meta: Mapping[str, Any], value: Any, source: str, *, nullable: bool) -> Any:
    """Check and convert one value to its field's kind; one-line SdtuneError naming the setting otherwise."""
    kind = meta["kind"]
    where = f"{source}: {name}"
    if value is None:
        if nullable:
            return None
        raise SdtuneError(f"{where} cannot be empty")
    if kind in ("str", "path"):
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise SdtuneError(f"{where} must be text, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SdtuneError(f"{where} must be a whole number, got {value!r}")
        return value
    if kind == "steps":  # a whole number, or "auto" (the cross-validated step count: `training.folds`)
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SdtuneError(f"{where} must be a whole number or auto, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise SdtuneError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SdtuneError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise SdtuneError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        if not isinstance(value, bool):
            raise SdtuneError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "lr":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SdtuneError(f"{where} must be a number or a schedule string, got {value!r}")
        from sdtune.training.schedules import parse_lr

        parse_lr(value)
        if isinstance(value, str):
            try:
                return float(value)  # a plain number typed on the command line
            except ValueError:
                return value.strip()
        return float(value)
    if kind == "strs":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise SdtuneError(f"{where} must be a list of texts, got {value!r}")
        return list(items)
    if kind == "ints":
        if isinstance(value, str):
            value = [value]
        items = [value] if isinstance(value, int) else value
        if not isinstance(items, (list, tuple)):
            raise SdtuneError(f"{where} must be a list of whole numbers, got {value!r}")
        items = [p for v in items for p in (re.split(r"[,\s]+", v.strip()) if isinstance(v, str) else [v]) if p != ""]
        out = []
        for v in items:
            if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SdtuneError(f"{where} must be a list of whole numbers, got {value!r}")
            out.append(v)
        return out
    raise AssertionError(kind)
