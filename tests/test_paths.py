"""`sdtune.paths`: readable inputs, writable outputs and the operating system's refusals as one line. The real
open and the real temp file are what count (root passes every `os.access` check), so these tests make the real
calls fail where root cannot be refused."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

import sdtune.paths as paths
from sdtune.cli.testing import run_cli
from sdtune.errors import SdtuneError


@pytest.mark.parametrize("err,full", [(errno.ENOSPC, True), (errno.EFBIG, True), (errno.EDQUOT, True),
                                      (errno.EACCES, False), (errno.EIO, False)])
def test_is_disk_full_os_errors(err: int, full: bool) -> None:
    assert paths.is_disk_full(OSError(err, "x")) is full


@pytest.mark.parametrize("text,full", [
    ("Error while serializing: I/O error: File too large (os error 27)", True),  # safetensors 0.4+, measured
    ("Error while serializing: I/O error: No space left on device (os error 28)", True),
    ("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left\" })", True),
    ("Error while serializing: I/O error: Permission denied (os error 13)", False),
    ("Error while deserializing header: HeaderTooLarge", False),
])
def test_is_disk_full_safetensors_errors(text: str, full: bool) -> None:
    from safetensors import SafetensorError

    assert paths.is_disk_full(SafetensorError(text)) is full
    assert paths.is_disk_full(ValueError(text)) is False  # only safetensors' own error type is read as text


def test_check_readable_catches_the_real_open(tmp_path: Path, monkeypatch: Any) -> None:
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x")
    assert paths.check_readable(f, "--lora a") == f

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", str(f))

    monkeypatch.setattr(paths, "open", denied, raising=False)  # os.access says yes (root); the open says no
    with pytest.raises(SdtuneError, match=r"^--lora a: cannot read this file \(permission denied\)"):
        paths.check_readable(f, "--lora a")
    assert paths.check_readable(tmp_path / "missing", "x") == tmp_path / "missing"  # the caller's message


def test_check_readable_folder_by_access(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(paths, "access", lambda p, mode: False)
    with pytest.raises(SdtuneError, match=r"cannot read this folder .*chmod u\+rx"):
        paths.check_readable(tmp_path, "data")


def test_check_writable_dir_makes_a_real_probe_and_leaves_nothing(tmp_path: Path, monkeypatch: Any) -> None:
    out = tmp_path / "new" / "deeper"
    assert paths.check_writable_dir(out, "--out") == out
    assert list(tmp_path.iterdir()) == []  # nothing created: neither the folder nor the probe file

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(paths.tempfile, "mkstemp", refused)
    with pytest.raises(SdtuneError, match=rf"^--out {out} is not writable \(its nearest existing folder {tmp_path} "):
        paths.check_writable_dir(out, "--out")


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path, monkeypatch: Any) -> None:
    from sdtune.atomic import write_atomic

    target = write_atomic(tmp_path / "config.toml", "old")

    def full(self: Path, data: str, **kwargs: Any) -> int:
        Path.write_bytes(self, data.encode()[:1])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SdtuneError, match=rf"^no space left writing {target}: free space or choose another --out$"):
        write_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]  # the temp file is gone


def test_cli_safety_net_maps_a_stray_permission_error(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    """The last resort in `sdtune.cli.main`: a PermissionError no check caught is still one line, exit 2."""
    import importlib

    identify_module = importlib.import_module("sdtune.formats.identify")  # the package re-exports the function
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"x")

    def refuse(path: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(identify_module, "identify", refuse)
    r = run_cli(["info", str(f)], capsys)
    assert r.code == 2 and r.err == f"error: permission denied: {f}; check its permissions (and its folder's), " \
                                     "or choose another path\n"


def test_cli_errors_are_one_line_even_with_invalid_utf8(capsys: Any) -> None:
    bad = b"x\xff".decode("utf-8", "surrogateescape")
    r = run_cli(["info", bad], capsys)
    assert r.code == 2 and r.err.count("\n") == 1 and "\\udcff" in r.err
