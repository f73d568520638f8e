"""`sdtune.atomic`: every file sdtune writes ends with the permissions a plain open() gives (0o666 minus the umask,
not mkstemp's 0600), and a failed write leaves the old file and no temp file behind."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from sdtune import atomic
from sdtune.atomic import atomic_path, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _plain_open_mode(tmp_path) -> int:
    probe = tmp_path / "plain"
    probe.write_text("x")
    return _mode(probe)


def test_text_and_bytes_get_the_mode_of_a_plain_open(tmp_path):
    want = _plain_open_mode(tmp_path)
    assert want == atomic.FILE_MODE and want != 0o600  # the test machine's umask is not 077
    assert _mode(write_atomic(tmp_path / "a.txt", "héllo")) == want
    assert _mode(write_atomic(tmp_path / "b.bin", b"\x00\x01")) == want
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"


def test_every_writer_of_model_files_keeps_normal_permissions(tmp_path):
    from sdtune.formats.safe_io import save_safetensors_atomic

    want = _plain_open_mode(tmp_path)
    st = save_safetensors_atomic({"x": torch.ones(2)}, tmp_path / "m.safetensors", {"k": "v"})
    assert _mode(st) == want
    from sdtune.formats.safe_io import save_torch_pickle_atomic

    assert _mode(save_torch_pickle_atomic({"x": torch.ones(1)}, tmp_path / "e.pt")) == want


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = write_atomic(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_the_temp_file_keeps_the_extension(tmp_path):
    """Writers that choose a format by extension (PIL, torch) see the real one."""
    with atomic_path(tmp_path / "grid.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".grid.png.")
        tmp.write_bytes(b"png")
    assert (tmp_path / "grid.png").read_bytes() == b"png"
