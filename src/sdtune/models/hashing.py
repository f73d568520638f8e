"""File hashes as A1111 shows them: models ("Model hash: 0123456789", first 10 hex chars of sha256), LoRAs and
hypernetworks (`memo_sha256`).

Hashing a multi-GB checkpoint takes seconds, so model hashes are cached by (path, size, mtime) in
$SDTUNE_CACHE_DIR/hashes.json (default ~/.cache/sdtune); adapter files are small and cached for the process only."""

from __future__ import annotations

import hashlib
import json
import os
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
        from sdtune.atomic import write_atomic

        write_atomic(_cache_file(), json.dumps(cache))
    except OSError:
        pass  # the cache is an optimisation only


_MEMO: dict[tuple, str] = {}


def file_key(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime): what identifies one version of a file for the hash caches."""
    p = Path(path)
    st = p.stat()
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


def _sha256(path: Path, *, tensor_data_only: bool = False) -> str:
    """sha256 of a file's bytes; tensor_data_only skips a .safetensors file's JSON header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if tensor_data_only and path.suffix.lower() == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def memo_sha256(path: str | Path, *, tensor_data_only: bool = False) -> str:
    """sha256 hex digest cached for this process by path, size and mtime. tensor_data_only: kohya/A1111's "addnet"
    hash of a .safetensors file (tensor data only, so editing metadata does not change it); other files are
    hashed whole."""
    key = (*file_key(path), tensor_data_only)
    if key not in _MEMO:
        _MEMO[key] = _sha256(Path(path), tensor_data_only=tensor_data_only)
    return _MEMO[key]


def file_sha256(path: str | Path) -> str:
    """Full sha256 hex digest of a file, cached on disk by path, size and mtime."""
    key = "|".join(map(str, file_key(path)))
    cache = _load_cache()
    if key in cache:
        return cache[key]
    digest = _sha256(Path(path).resolve())
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
