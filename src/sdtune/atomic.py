"""The one way sdtune writes a file: into a temp file beside it, fsync, then `os.replace` onto the final name.

A crash (kill -9, a full disk) never leaves a half-written file under the final name, and an existing file stays
intact until the new one is complete. The result gets the permissions a plain `open()` would give (0o666 minus the
umask, as A1111 writes its files): `tempfile.mkstemp` creates 0600 files, which would hide models from another user
or a ComfyUI container reading the same folder.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it, which is not thread-safe
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK  # what a plain mkdir gives (tempfile.mkdtemp makes 0700)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temp path in `path`'s folder (same extension, so writers that look at it behave); when the block
    ends without an error the temp file becomes `path`, else it is removed. A full disk (ENOSPC, EDQUOT, EFBIG,
    or safetensors' report of one) or a permission refusal becomes a one-line SdtuneError."""
    from sdtune.paths import writing

    out = Path(path)
    with writing(out):  # a full disk or a read-only folder: one line naming the file, never a traceback
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp" + out.suffix, dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, FILE_MODE)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_atomic(path: str | Path, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write bytes or text to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)
    return Path(path)
