"""Resumable training state in OUT/state, written so that a crash or `kill -9` at any moment leaves the last
completed state loadable.

Layout:

    OUT/state/
      latest                      name of the newest complete state folder (written last, atomically)
      step-000120-<id>/           one complete state
        weights.safetensors       the method's trained weights
        optimizer.safetensors     optimizer tensors (structure and numbers in state.json)
        rng.safetensors           torch CPU (and CUDA) generator states
        state.json                step, data position, python/numpy RNG, history, config (written last)
      .lock                       held (flock) while a run trains into OUT

A state is written into a hidden temp folder, fsynced and renamed into place; then `latest` is replaced; then
older states beyond `keep` are deleted. Nothing here is a pickle.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from sdtune.errors import SdtuneError
from sdtune.atomic import write_atomic

STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)-[0-9a-f]+$")


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    epoch: int
    cursor: int                              # next batch within the epoch
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]                # torch optimizer state_dict
    rng: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    snapshots: list[dict[str, torch.Tensor]] = field(default_factory=list)  # average_checkpoints' raw weights
    path: Path | None = None


# ------------------------------------------------------------------------------------------------------ RNG

def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) global RNG states."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global RandomState is an MT19937: the legacy tuple, not a dict
    name, keys, pos, has_gauss, cached = np_state
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------ optimizer

def optimizer_to_files(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups, "indices": [str(i) for i in sd["state"]]}


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): {} for i in rest["indices"]}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state[int(idx)][name] = v
    for idx, entry in rest["scalars"].items():
        state[int(idx)].update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------- store

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(clean, str(path))
    _fsync_file(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as exc:  # a truncated or overwritten file: reported as a damaged state
        raise ValueError(f"{path.name}: {exc}") from None


class StateStore:
    """The OUT/state folder: save, find and load resumable states."""

    def __init__(self, folder: str | Path, keep: int = 1) -> None:
        self.folder = Path(folder)
        self.keep = max(1, int(keep))
        self._lock_fd: int | None = None

    # -- locking -------------------------------------------------------------------------------------------

    def lock(self) -> None:
        """Refuse a second run training into the same folder at the same time (released on exit, even kill -9)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SdtuneError(f"another training run is writing to {self.folder.parent}; wait for it or use "
                              "another --out") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock; a run that saved nothing (it failed while preparing) leaves no state folder behind.
        Unlinking the lock file while holding it is safe: locks are only ever tried without waiting."""
        if self._lock_fd is not None:
            try:
                if [p.name for p in self.folder.iterdir()] == [".lock"]:
                    (self.folder / ".lock").unlink()
                    self.folder.rmdir()
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- finding -------------------------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete state folders (state.json present), oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "state.json").is_file():
                found.append((int(m.group(1)), p.stat().st_mtime_ns, p))
        return [p for _, _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The state `latest` names, or (if the pointer is missing or stale) the newest complete state."""
        pointer = self.folder / "latest"
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except OSError:
            name = ""
        if name and (self.folder / name / "state.json").is_file():
            return self.folder / name
        done = self.complete()
        return done[-1] if done else None

    def clean_temp(self) -> None:
        """Remove half-written folders left by a crash (call with the lock held)."""
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                if p.name.startswith(".tmp-") and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.name.startswith(".latest.") and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)

    # -- saving --------------------------------------------------------------------------------------------

    def save(self, state: TrainState) -> Path:
        """Write `state` as a new complete folder (then `latest` names it). A full disk or a refused write is one
        line; the half-written folder is removed and the previous state stays the one `--resume` continues."""
        from sdtune.paths import writing

        with writing(self.folder / f"step-{state.step:06d}"):
            return self._save(state)

    def _save(self, state: TrainState) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{state.step:06d}-{time.time_ns():x}"
        tmp = self.folder / f".tmp-{name}"
        tmp.mkdir()
        try:
            _save_tensors(state.weights, tmp / "weights.safetensors")
            opt_tensors, opt_rest = optimizer_to_files(state.optimizer)
            _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
            rng = dict(state.rng)
            rng_tensors = {"torch": rng.pop("torch")} if "torch" in rng else {}
            for i, s in enumerate(rng.pop("cuda", []) or []):
                rng_tensors[f"cuda.{i}"] = s
            _save_tensors(rng_tensors, tmp / "rng.safetensors")
            if state.snapshots:
                _save_tensors({f"{i}/{k}": v for i, snap in enumerate(state.snapshots) for k, v in snap.items()},
                              tmp / "snapshots.safetensors")
            doc = {"version": STATE_VERSION, "step": state.step, "epoch": state.epoch, "cursor": state.cursor,
                   "rng": rng, "optimizer": opt_rest, "history": state.history, "config": state.config,
                   "extra": state.extra, "time": time.time()}
            with open(tmp / "state.json", "w", encoding="utf-8") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, self.folder / name)
            _fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_atomic(self.folder / "latest", name + "\n")
        _fsync_dir(self.folder)
        self.prune()
        return self.folder / name

    def prune(self) -> None:
        latest = self.latest()
        done = [p for p in self.complete() if p != latest]
        keep = self.keep - 1
        for p in done[:len(done) - keep] if keep else done:
            shutil.rmtree(p, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------------

    def load(self, path: str | Path | None = None) -> TrainState:
        """Load `path` (a state folder, or an OUT/state or OUT folder for its latest), default the latest here."""
        if path is None:
            p = self.latest()
        else:
            p = Path(path).expanduser()
            if not (p / "state.json").is_file():  # an OUT/state folder, or OUT itself
                p = StateStore(p).latest() or StateStore(p / "state").latest()
        if p is None or not (p / "state.json").is_file():
            raise SdtuneError(f"no saved training state in {path or self.folder}; start without --resume")
        try:
            doc = json.loads((p / "state.json").read_text(encoding="utf-8"))
            weights = _load_tensors(p / "weights.safetensors")
            opt = optimizer_from_files(_load_tensors(p / "optimizer.safetensors"), doc["optimizer"])
            rng_t = _load_tensors(p / "rng.safetensors")
            flat = _load_tensors(p / "snapshots.safetensors") if (p / "snapshots.safetensors").is_file() else {}
        except (OSError, ValueError, KeyError) as exc:
            raise SdtuneError(f"the training state {p} is damaged ({exc}); remove that folder to fall back to an "
                              "older state, or start again") from None
        if doc.get("version") != STATE_VERSION:
            raise SdtuneError(f"the training state {p} was written by another sdtune version "
                              f"({doc.get('version')}); start again")
        rng = dict(doc.get("rng", {}))
        if "torch" in rng_t:
            rng["torch"] = rng_t["torch"]
        cuda = [rng_t[k] for k in sorted((k for k in rng_t if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if cuda:
            rng["cuda"] = cuda
        return TrainState(step=int(doc["step"]), epoch=int(doc["epoch"]), cursor=int(doc["cursor"]), weights=weights,
                          optimizer=opt, rng=rng, history=doc.get("history", {}), config=doc.get("config", {}),
                          extra=doc.get("extra", {}), snapshots=_unflatten_snapshots(flat), path=p)


def _unflatten_snapshots(flat: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        i, name = key.split("/", 1)
        snaps.setdefault(int(i), {})[name] = value
    return [snaps[i] for i in sorted(snaps)]


def link_or_copy(src: Path, dst: Path) -> Path:
    """Make `dst` a copy of `src` atomically (a hard link when possible, else a byte copy)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        # rename() of two links to one file does nothing (POSIX) and leaves tmp: a resumed run whose best
        # checkpoint is still the one `dst` links to.
        tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
