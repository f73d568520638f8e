"""Prompt tags that name adapter files (`<lora:name:weight>`, `<hypernet:name:strength>`) resolved to files in
search folders, the same way for every adapter kind (A1111's lookup)."""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from sdtune.errors import SdtuneError
from sdtune.paths import scanned_dir

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str, Path]] = set()  # ambiguous tags already reported in this process


@dataclass(frozen=True)
class TagKind:
    """One adapter kind's tags and files. exts: the file extensions searched; with `by_preference` they are in
    order of preference, so files that differ only in extension are ranked (not ambiguous), else files are taken
    in name order and several matches are warned about."""

    tag: str                 # the tag as messages write it: "lora" -> `<lora:name>`
    kinds: tuple[str, ...]   # the extra-network kinds resolved (others are ignored); the first is the default
    noun: str                # "LoRA", for messages
    dir_option: str          # the command-line option that adds a search folder
    exts: tuple[str, ...]
    by_preference: bool = False


def _fields(tag: Any, default_kind: str) -> tuple[str, float, str]:
    """(name, weight, kind) of an ExtraNetwork object (kind, name, weight) or a (name, weight) pair."""
    if isinstance(tag, (tuple, list)):
        return str(tag[0]), float(tag[1]) if len(tag) > 1 else 1.0, default_kind
    return str(tag.name), float(getattr(tag, "weight", 1.0)), str(getattr(tag, "kind", default_kind))


def prompt_tags(kind: TagKind, prompt: str) -> list[Any]:
    """The prompt's extra-network tags of this kind (ExtraNetwork objects), in prompt order."""
    from sdtune.prompts.extra_networks import extract_extra_networks

    return [n for n in extract_extra_networks(prompt or "")[1] if n.kind in kind.kinds]


def _files(root: Path) -> list[Path]:
    """Every file under `root`, except in hidden folders and training states (`paths.scanned_dir`)."""
    out: list[Path] = []
    for dirpath, dirs, files in os.walk(root, followlinks=True):  # as rglob did: linked LoRA folders count
        dirs[:] = [d for d in dirs if scanned_dir(dirpath, d)]
        out += [Path(dirpath) / f for f in files]
    return out


def _candidates(kind: TagKind, search_dirs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(search folder, file) of every file of this kind, folder by folder."""
    out: list[tuple[Path, Path]] = []
    for d in search_dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise SdtuneError(f"{kind.noun} folder {root} does not exist")
        found = [f for f in _files(root) if f.suffix.lower() in kind.exts]
        if kind.by_preference:
            found.sort(key=lambda f: (f.with_suffix("").as_posix(), kind.exts.index(f.suffix.lower())))
        else:
            found.sort()
        out += [(root, f) for f in found]
    return out


def _not_found(kind: TagKind, name: str, files: list[tuple[Path, Path]], search_dirs: Sequence[str | Path]) -> str:
    stems = sorted({f.stem for _, f in files})
    lower = {s.lower(): s for s in stems}
    near = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=5, cutoff=0.5)]
    hint = f"; did you mean {', '.join(near)}?" if near else (
        f"; available: {', '.join(stems[:10])}" + (" ..." if len(stems) > 10 else "") if stems else
        f"; the folders contain no {kind.noun} files")
    return f"<{kind.tag}:{name}> not found in {', '.join(str(d) for d in search_dirs)}{hint}"


def resolve_tags(kind: TagKind, tags: Iterable[Any], search_dirs: Sequence[str | Path]) -> list[tuple[Path, float]]:
    """Tags of `kind` -> [(file, weight)] in tag order; tags of other kinds are ignored.

    tags: the prompt layer's ExtraNetwork objects (kind, name, weight) or (name, weight) pairs. name is a file stem
    (A1111) or a path relative to a search folder without extension (`style/ink`). Folders are searched recursively
    in the given order; the first folder with a match wins, and an exact-case match beats a case-insensitive one.
    An unknown name raises an SdtuneError listing near names."""
    wanted = [(n, w) for n, w, k in (_fields(t, kind.kinds[0]) for t in tags) if k in kind.kinds]
    if not wanted:
        return []
    if not search_dirs:
        raise SdtuneError(f"the prompt uses <{kind.tag}:{wanted[0][0]}:...> but no {kind.noun} folder is given; "
                          f"pass {kind.dir_option}")
    files = _candidates(kind, search_dirs)

    def rel_of(root: Path, f: Path) -> str:
        return f.relative_to(root).with_suffix("").as_posix()

    out: list[tuple[Path, float]] = []
    for name, weight in wanted:
        rel = name.replace("\\", "/")
        exact = [(r, f) for r, f in files if f.stem == rel or rel_of(r, f) == rel]
        loose = [(r, f) for r, f in files if f.stem.lower() == rel.lower() or rel_of(r, f).lower() == rel.lower()]
        matches = exact or loose
        if not matches:
            raise SdtuneError(_not_found(kind, name, files, search_dirs))
        found = [f for r, f in matches if r == matches[0][0]]  # the first folder with a match wins
        ambiguous = len({f.with_suffix("") for f in found} if kind.by_preference else found) > 1
        if ambiguous and (kind.tag, name, found[0]) not in _WARNED:  # once: the tags are resolved for every image
            _WARNED.add((kind.tag, name, found[0]))
            log.warning("<%s:%s> matches %d files in %s; using %s", kind.tag, name, len(found), matches[0][0],
                        found[0])
        out.append((found[0], weight))
    return out
