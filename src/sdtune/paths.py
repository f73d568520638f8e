"""Checks on the files and folders a command is given, made *before* anything slow runs, and the one mapping of
the operating system's refusals (permission denied, disk full) to one-line `SdtuneError`s.

Why one module: a command that loads a model for a minute and then finds its --out read-only (or its data folder
unreadable) wastes the minute and used to end in a PermissionError traceback. Every command asks here first. The
checks use `os.access` *and* open the path for real, catching PermissionError: `os.access` alone is wrong under
root (which bypasses permission bits), ACLs and some network file systems, while the real open is what counts.
`access` is the one indirection tests replace to simulate an unreadable path where they run as root.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sdtune.errors import SdtuneError

# ENOSPC: the disk is full; EDQUOT: the user's quota is; EFBIG: the file is larger than the file system or the
# process's limit (RLIMIT_FSIZE) allows. The user's remedy is the same for all three.
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e is not None)
# safetensors (Rust) reports I/O errors as text: "I/O error: File too large (os error 27)" (0.4+) or
# `IoError(Os { code: 28, kind: StorageFull, ... })` (Debug formatting, older releases).
_RUST_DISK_FULL = re.compile(r"os error (\d+)|code: (\d+),|StorageFull|FileTooLarge|QuotaExceeded")


def scanned_dir(parent: str | os.PathLike[str], name: str) -> bool:
    """Whether a folder scan for models, LoRAs, embeddings or hypernetworks goes into `parent/name`: not hidden ones
    and not a training run's resumable state (`OUT/state/step-*/`, marked by its `state.json`), whose weights,
    optimizer and RNG files are not adapters (`--embeddings RUN_DIR` would read them as words)."""
    return not name.startswith(".") and not os.path.isfile(os.path.join(parent, name, "state.json"))


def remove_if_unused(folder: str | os.PathLike[str]) -> None:
    """Remove `folder` if a failed command left nothing in it but empty folders and lock files (an `--out` it
    created before refusing the input); a folder holding anything else is kept as it is."""
    root = Path(folder)
    if not root.is_dir():
        return
    for dirpath, _, files in os.walk(root):
        if any(f != ".lock" and not f.startswith(".write-test.") for f in files):
            return
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def access(path: str | os.PathLike[str], mode: int) -> bool:
    """`os.access` (the seam tests replace)."""
    return os.access(path, mode)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` means the disk (or quota, or file size limit) is full: an OSError, or safetensors' error."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    if type(exc).__name__ == "SafetensorError":
        for m in _RUST_DISK_FULL.finditer(str(exc)):
            code = m.group(1) or m.group(2)
            if code is None or int(code) in DISK_FULL_ERRNOS:
                return True
    return False


def disk_full_error(path: str | os.PathLike[str]) -> SdtuneError:
    return SdtuneError(f"no space left writing {path}: free space or choose another --out")


def os_error(exc: BaseException, path: str | os.PathLike[str] | None = None) -> SdtuneError | None:
    """The one-line error for a refusal by the operating system (disk full, permission denied, read-only file
    system), or None when `exc` is something else."""
    where = path if path is not None else getattr(exc, "filename", None) or "a file"
    if is_disk_full(exc):
        return disk_full_error(where)
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return SdtuneError(f"file name too long: {str(where)[:80]}...; use a shorter name or path")
    if isinstance(exc, ValueError) and "embedded null byte" in str(exc):
        return SdtuneError("a path contains a NUL byte (\\0); retype it")
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        return SdtuneError(f"permission denied: {where}; check its permissions (and its folder's), or choose "
                           "another path")
    return None


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turns disk-full and permission errors raised while writing `path` into their one-line SdtuneError."""
    try:
        yield
    except SdtuneError:
        raise
    except Exception as exc:
        mapped = os_error(exc, path)
        if mapped is None:
            raise
        raise mapped from exc


NAME_MAX = 255  # bytes per file name on ext4, XFS, btrfs, APFS and NTFS (in UTF-16 units there)


def check_name(path: str | os.PathLike[str], what: str) -> Path:
    """Refuse a path with a name longer than file systems allow: the OS would say ENAMETOOLONG from the first
    `exists()` on, which is no answer a user can act on."""
    p = Path(path).expanduser()
    for part in p.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise SdtuneError(f"{what}: the name {part[:24]!r}... is {len(os.fsencode(part))} bytes long; file "
                              f"systems allow {NAME_MAX}, use a shorter name")
    return p


def check_readable(path: str | os.PathLike[str], what: str) -> Path:
    """`path` exists and can be read: a file is opened, a folder listed. `what` names it for the user (e.g.
    "--lora a.safetensors"). Missing paths are left to the caller's own message (it knows what was meant)."""
    p = check_name(path, what)
    if not p.exists():
        return p
    is_dir = p.is_dir()
    denied = not access(p, os.R_OK | (os.X_OK if is_dir else 0))
    if not denied:
        try:
            if is_dir:
                with os.scandir(p) as it:
                    next(it, None)
            else:
                with open(p, "rb") as f:
                    f.read(1)
        except PermissionError:
            denied = True
        except IsADirectoryError:
            pass
    if denied:
        raise _denied(what, "folder" if is_dir else "file")
    return p


def check_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """`path` is, or can be created as, a folder this process can write in; nothing is created. The nearest
    existing ancestor must be a writable folder (a file on the way is refused too)."""
    p = check_name(path, f"{what} {path}")
    if p.exists() and not p.is_dir():
        raise SdtuneError(f"{what} {p} is a file, not a folder; choose a folder")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SdtuneError(f"{what} {p} is not writable: cannot create the folder ({probe} is a file); choose "
                          "another path")
    where = "" if probe == p else f" (its nearest existing folder {probe} is not writable)"
    if not access(probe, os.W_OK | os.X_OK):
        raise SdtuneError(f"{what} {p} is not writable{where}; choose another folder or fix its permissions")
    try:  # the real test: root passes os.access everywhere, read-only mounts and ACLs fool it
        fd, name = tempfile.mkstemp(dir=probe, prefix=".sdtune-write-test.")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(p) from None
        raise SdtuneError(f"{what} {p} is not writable{where} ({exc.strerror or exc}); choose another folder or "
                          "fix its permissions") from None
    return p


def check_writable_file(path: str | os.PathLike[str], what: str) -> Path:
    """A new file at `path` can be created: its folder is (or can be) a writable folder."""
    p = Path(path).expanduser()
    check_writable_dir(p.parent if str(p.parent) else Path("."), f"{what}: the folder of")
    return p


def _denied(what: str, kind: str) -> SdtuneError:
    return SdtuneError(f"{what}: cannot read this {kind} (permission denied); fix its permissions "
                       f"(chmod u+r{'x' if kind == 'folder' else ''}) or run as its owner")


def read_bytes(path: str | os.PathLike[str], what: str | None = None) -> bytes:
    """The whole file; an unreadable one is a one-line SdtuneError naming it (`what`, default the path)."""
    p = Path(path)
    if not access(p, os.R_OK):
        raise _denied(what or str(p), "file")
    try:
        return p.read_bytes()
    except PermissionError:
        raise _denied(what or str(p), "file") from None
