"""A1111 conventions around LoRA use: `<lora:name:weight>` tags resolved to files, `--lora FILE[:W]`, and the
infotext field `Lora hashes: "name: hash, ..."` (hash = A1111's / kohya's short hash: the first 12 hex digits of the
sha256 of a .safetensors file's tensor data, i.e. everything after the JSON header, so editing metadata does not
change it; other files: sha256 of the whole file)."""

from __future__ import annotations

import difflib
import hashlib
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

from sdtune.adapters.args import parse_file_weight
from sdtune.errors import SdtuneError

log = logging.getLogger(__name__)

LORA_EXTS = (".safetensors", ".pt", ".ckpt", ".bin")
_HASHES: dict[tuple, str] = {}


def lora_sha256(path: str | Path) -> str:
    """kohya/A1111 "addnet" sha256 for .safetensors (tensor data only), plain sha256 for other files."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if p.suffix.lower() == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def lora_short_hash(path: str | Path) -> str:
    """A1111's LoRA short hash (12 hex digits)."""
    return lora_sha256(path)[:12]


def _clean_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")  # A1111 drops the field separators from names


def lora_hashes_value(entries: Iterable[tuple[str, str]]) -> str | None:
    """The value of A1111's `Lora hashes` field: "name: hash, name2: hash2" (None when empty)."""
    parts = [f"{_clean_name(n)}: {h}" for n, h in entries if h]
    return ", ".join(parts) or None


def add_infotext_field(infotext: str, key: str, value: str | None) -> str:
    """Insert `key: value` into an infotext's parameter line before `Version:` (A1111's order), quoting the value
    as A1111 does. None leaves the text unchanged."""
    if value is None:
        return infotext
    from sdtune.generate.pnginfo import format_value

    field = f"{key}: {format_value(value)}"
    head, sep, last = infotext.rpartition("\n")
    marker = ", Version: "
    if marker in last:
        i = last.rindex(marker)
        last = f"{last[:i]}, {field}{last[i:]}"
    elif last.startswith("Version: "):
        last = f"{field}, {last}"
    else:
        last = f"{last}, {field}" if last else field
    return f"{head}{sep}{last}"


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:WEIGHT]` -> (FILE, weight); the weight defaults to 1 (a `C:\\...` drive letter is not a weight)."""
    return parse_file_weight(text, "--lora", "weight")


def _tag_fields(tag: Any) -> tuple[str, float, str]:
    if isinstance(tag, (tuple, list)):
        name, weight = tag[0], tag[1] if len(tag) > 1 else 1.0
        return str(name), float(weight), "lora"
    return str(tag.name), float(getattr(tag, "weight", 1.0)), str(getattr(tag, "kind", "lora"))


def _candidates(search_dirs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    out = []
    for d in search_dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            raise SdtuneError(f"LoRA folder {root} does not exist")
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix.lower() in LORA_EXTS:
                out.append((root, f))
    return out


def resolve_lora_tags(tags: Iterable[Any], search_dirs: Sequence[str | Path]) -> list[tuple[Path, float]]:
    """`<lora:name:weight>` tags -> [(file, weight)], in tag order.

    tags: the prompt layer's ExtraNetwork objects (kind, name, weight) or (name, weight) pairs; kinds other than
    lora/lyco are ignored. name is a file stem (A1111), or a path relative to a search folder without extension
    (`style/ink`). Folders are searched recursively in the given order; the first folder with a match wins, and
    an exact-case match beats a case-insensitive one. An unknown name raises an SdtuneError listing near names."""
    wanted = [(n, w) for n, w, kind in map(_tag_fields, tags) if kind in ("lora", "lyco")]
    if not wanted:
        return []
    if not search_dirs:
        raise SdtuneError(f"the prompt uses <lora:{wanted[0][0]}:...> but no LoRA folder is given; pass --lora-dir")
    files = _candidates(search_dirs)
    out: list[tuple[Path, float]] = []
    for name, weight in wanted:
        rel = name.replace("\\", "/")
        exact = [(root, f) for root, f in files
                 if f.stem == rel or f.relative_to(root).with_suffix("").as_posix() == rel]
        loose = [(root, f) for root, f in files if f.stem.lower() == rel.lower()
                 or f.relative_to(root).with_suffix("").as_posix().lower() == rel.lower()]
        matches = exact or loose
        found = [f for root, f in matches if root == matches[0][0]] if matches else []  # first folder wins
        if not found:
            stems = sorted({f.stem for _, f in files})
            lower = {s.lower(): s for s in stems}
            near = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=5, cutoff=0.5)]
            hint = f"; did you mean {', '.join(near)}?" if near else (
                f"; available: {', '.join(stems[:10])}" + (" ..." if len(stems) > 10 else "") if stems else
                "; the folders contain no LoRA files")
            raise SdtuneError(f"<lora:{name}> not found in {', '.join(str(d) for d in search_dirs)}{hint}")
        if len(found) > 1:
            log.warning("<lora:%s> matches %d files in %s; using %s", name, len(found), matches[0][0], found[0])
        out.append((found[0], weight))
    return out
