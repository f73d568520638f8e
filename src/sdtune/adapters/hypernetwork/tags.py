"""A1111 conventions around hypernetwork use: `--hypernetwork FILE[:STRENGTH]`, `<hypernet:name:strength>` prompt
tags resolved to files in search folders, and A1111's short hash (first 10 hex digits of the file's sha256)."""

from __future__ import annotations

import difflib
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

from sdtune.adapters.args import parse_file_weight
from sdtune.errors import SdtuneError

log = logging.getLogger(__name__)

HYPERNETWORK_EXTS = (".pt", ".safetensors", ".ckpt", ".pth")
_HASHES: dict[tuple, str] = {}


def hypernetwork_sha256(path: str | Path) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def hypernetwork_short_hash(path: str | Path) -> str:
    return hypernetwork_sha256(path)[:10]


def parse_hypernetwork_arg(text: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]` -> (FILE, strength); strength defaults to 1 (a `C:\\...` drive letter is not one)."""
    return parse_file_weight(text, "--hypernetwork", "strength")


def _fields(tag: Any) -> tuple[str, float, str]:
    if isinstance(tag, (tuple, list)):
        return str(tag[0]), float(tag[1]) if len(tag) > 1 else 1.0, "hypernet"
    return str(tag.name), float(getattr(tag, "weight", 1.0)), str(getattr(tag, "kind", "hypernet"))


def resolve_hypernet_tags(tags: Iterable[Any], search_dirs: Sequence[str | Path]) -> list[tuple[Path, float]]:
    """`<hypernet:name:strength>` tags -> [(file, strength)] in tag order; other kinds are ignored.

    name is a file stem or a path relative to a search folder without extension; folders are searched
    recursively in order, the first folder with a match wins, an exact-case match beats a case-insensitive one,
    and among files of the same stem .safetensors beats .pt. An unknown name raises an SdtuneError with near
    names."""
    wanted = [(n, w) for n, w, kind in map(_fields, tags) if kind == "hypernet"]
    if not wanted:
        return []
    if not search_dirs:
        raise SdtuneError(f"the prompt uses <hypernet:{wanted[0][0]}:...> but no hypernetwork folder is given; pass "
                          "--hypernetwork-dir")
    files: list[tuple[Path, Path]] = []
    for d in search_dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise SdtuneError(f"hypernetwork folder {root} does not exist")
        found = [f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in HYPERNETWORK_EXTS]
        found.sort(key=lambda f: (f.with_suffix("").as_posix(), HYPERNETWORK_EXTS.index(f.suffix.lower())
                                  if f.suffix.lower() != ".safetensors" else -1))
        files += [(root, f) for f in found]
    out = []
    for name, strength in wanted:
        rel = name.replace("\\", "/")

        def rel_of(root: Path, f: Path) -> str:
            return f.relative_to(root).with_suffix("").as_posix()

        exact = [(r, f) for r, f in files if f.stem == rel or rel_of(r, f) == rel]
        loose = [(r, f) for r, f in files if f.stem.lower() == rel.lower() or rel_of(r, f).lower() == rel.lower()]
        matches = exact or loose
        if not matches:
            stems = sorted({f.stem for _, f in files})
            lower = {s.lower(): s for s in stems}
            near = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=5, cutoff=0.5)]
            hint = f"; did you mean {', '.join(near)}?" if near else (
                f"; available: {', '.join(stems[:10])}" if stems else "; the folders hold no hypernetwork files")
            raise SdtuneError(f"<hypernet:{name}> not found in {', '.join(str(d) for d in search_dirs)}{hint}")
        first = [f for r, f in matches if r == matches[0][0]]
        if len({f.with_suffix("") for f in first}) > 1:
            log.warning("<hypernet:%s> matches %d files; using %s", name, len(first), first[0])
        out.append((first[0], strength))
    return out
