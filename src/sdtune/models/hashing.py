"""Model hashes as A1111 shows them ("Model hash: 0123456789"): first 10 hex chars of sha256.

Hashing a multi-GB checkpoint takes seconds, so results are cached by (path, size, mtime) in
$SDTUNE_CACHE_DIR/hashes.json (default ~/.cache/sdtune)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def _cache_file() -> Path:
    root = os.environ.get("SDTUNE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sdtune")
    return Path(root) / "hashes.json"


def _load_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_cache(cache: dict[str, str]) -> None:
    try:
        f = _cache_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".hashes.", suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump(cache, out)
        os.replace(tmp, f)
    except OSError:
        pass  # the cache is an optimisation only


def file_sha256(path: str | Path) -> str:
    """Full sha256 hex digest of a file, cached by path, size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache = _load_cache()
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    cache[key] = digest
    _store_cache(cache)
    return digest


def file_hash(path: str | Path) -> str:
    """A1111's "Model hash" of a single file: sha256[:10]."""
    return file_sha256(path)[:10]


def folder_hash(folder: str | Path) -> str:
    """A stable 10-hex-char hash of a diffusers folder: sha256 over (relative path, sha256) of its weight files
    in sorted order, so it changes exactly when a weight file changes."""
    root = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(file_sha256(p).encode())
        h.update(b"\n")
    return h.hexdigest()[:10]
