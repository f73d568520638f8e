"""A1111 conventions around hypernetwork use: `--hypernetwork FILE[:STRENGTH]`, `<hypernet:name:strength>` prompt
tags resolved to files in search folders, and A1111's short hash (first 10 hex digits of the file's sha256)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from sdtune.adapters.args import parse_file_weight
from sdtune.adapters.tags import TagKind, resolve_tags
from sdtune.models.hashing import memo_sha256

# among files of one name .safetensors wins, then the others in this order
HYPERNET_TAGS = TagKind(tag="hypernet", kinds=("hypernet",), noun="hypernetwork", dir_option="--hypernetwork-dir",
                        exts=(".safetensors", ".pt", ".ckpt", ".pth"), by_preference=True)


def hypernetwork_short_hash(path: str | Path) -> str:
    return memo_sha256(path)[:10]


def parse_hypernetwork_arg(text: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]` -> (FILE, strength); strength defaults to 1 (a `C:\\...` drive letter is not one)."""
    return parse_file_weight(text, "--hypernetwork", "strength")


def resolve_hypernet_tags(tags: Iterable[Any], search_dirs: Sequence[str | Path]) -> list[tuple[Path, float]]:
    """`<hypernet:name:strength>` tags -> [(file, strength)] in tag order (`adapters.tags`); among files of the
    same stem .safetensors beats .pt."""
    return resolve_tags(HYPERNET_TAGS, tags, search_dirs)
