"""click options generated from config fields (`training.options.opt` metadata): one source of truth for names,
help, defaults and choices of `sdtune train` (and of anything else built from the same schema)."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from sdtune.training.options import KINDS

def click_options(fields: Iterable[dataclasses.Field]) -> list[Any]:
    """click options for config fields: --name-with-dashes, default None (so only given flags override)."""
    import click

    out = []
    for f in fields:
        meta = f.metadata
        if not meta.get("cli", True) or meta.get("kind") not in KINDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = "" if default in (None, [], "") else f" [default: {_shown(default)}]"
        help_text = meta["help"] + shown
        kind = meta["kind"]
        kw: dict[str, Any] = {"default": None, "help": help_text}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if kind == "bool":
            out.append(click.option(f"{flag}/--no-{flag[2:]}", f.name, **kw))
            continue
        if meta.get("choices"):
            kw["type"] = click.Choice(meta["choices"])
        elif kind == "int":
            kw["type"] = int
        elif kind == "float":
            kw["type"] = float
        if kind == "strs":
            kw.update(multiple=True, default=())
            flag = flag.rstrip("s")  # --sample-prompt TEXT, repeated
        elif kind == "ints":
            kw.update(multiple=True, default=())
            flag = flag.rstrip("s")
        if f.name == "resume":
            kw.update(is_flag=False, flag_value="auto")
        out.append(click.option(flag, f.name, **kw))
    return out


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)
