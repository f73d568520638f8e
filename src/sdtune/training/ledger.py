"""`CheckpointLedger`: the evaluated checkpoints of a run and which one wins.

It keeps one row per checkpoint (step, mean train loss since the previous one, validation loss, evaluator metrics,
file), feeds the selection metric to `Selection` (best checkpoint, early stopping), prunes checkpoint files
(`keep_checkpoints`), and holds the raw weights of the last checkpoints for `average_checkpoints`. Everything it
holds is part of the resumable state (`history()` / `snapshots`), so a resumed run selects exactly as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.training.validation import Selection


class CheckpointLedger:
    def __init__(self, out: Path, selection: Selection, *, selecting: bool, keep: str, average: int,
                 writes: bool = True) -> None:
        self.out = out
        self.writes = writes        # False in a process that is not the run's main one: it deletes no files
        self.selection = selection
        self.selecting = selecting  # False: no metric to select by, the last checkpoint wins
        self.keep = keep            # keep_checkpoints: all | best | last
        self.average = average      # average_checkpoints N
        self.rows: list[dict[str, Any]] = []
        self.pending: list[float] = []  # train losses since the last checkpoint
        self.snapshots: list[dict[str, torch.Tensor]] = []

    # -- recording ------------------------------------------------------------------------------------------

    def add_loss(self, loss: float) -> None:
        self.pending.append(loss)

    def record(self, step: int, path: Path, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Add the row of a checkpoint just saved and evaluated; update the selection; prune old files."""
        metrics = dict(metrics)
        train_loss = sum(self.pending) / len(self.pending) if self.pending else None
        self.pending = []
        row: dict[str, Any] = {"step": step, "train_loss": train_loss, "val_loss": metrics.pop("val_loss", None),
                               **metrics, "file": path.relative_to(self.out).as_posix()}
        self.rows.append(row)
        if self.selecting:
            value = row.get(self.selection.metric)
            if value is None:
                raise SdtuneError(f"select_by {self.selection.metric!r} is not among the evaluation's metrics "
                                  f"({', '.join(k for k in row if k not in ('step', 'file')) or 'none'})")
            self.selection.update(step, value)
        self._prune(step)
        return row

    def best_step(self) -> int | None:
        if self.selecting:
            return self.selection.best_step
        return self.rows[-1]["step"] if self.rows else None

    def row(self, step: int) -> dict[str, Any]:
        return next(r for r in self.rows if r["step"] == step)

    def _prune(self, current: int) -> None:
        if self.keep == "all" or not self.writes:
            return
        keep_step = current if self.keep == "last" else (self.best_step() or current)
        for r in self.rows:
            if r["step"] != keep_step:
                (self.out / r["file"]).unlink(missing_ok=True)

    def summary_rows(self) -> list[dict[str, Any]]:
        """The rows as summary.csv/json show them: a pruned file is None, the selected row is marked best."""
        best = self.best_step()
        return [{**r, "file": r["file"] if (self.out / r["file"]).exists() else None, "best": r["step"] == best}
                for r in self.rows]

    # -- checkpoint averaging -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def averaged(self, method: Any, device: torch.device) -> Iterator[None]:
        """average_checkpoints N: the method holds the mean of this and the N-1 previous checkpoints' weights while
        the checkpoint is saved and evaluated, then the raw weights again (training goes on from those)."""
        if self.average <= 1:
            yield
            return
        raw = {k: v.detach().to("cpu", copy=True) for k, v in method.state_dict().items()}
        self.snapshots = (self.snapshots + [raw])[-self.average:]
        mean = {k: torch.stack([snap[k].float() for snap in self.snapshots]).mean(0).to(v.dtype)
                for k, v in raw.items()}
        method.load_state_dict({k: v.to(device) for k, v in mean.items()})
        try:
            yield
        finally:
            method.load_state_dict({k: v.to(device) for k, v in raw.items()})

    # -- resumable state ------------------------------------------------------------------------------------

    def history(self, **extra: Any) -> dict[str, Any]:
        return {"rows": self.rows, "pending": self.pending, "selection": self.selection.state_dict(), **extra}

    def load(self, history: Mapping[str, Any], snapshots: list[dict[str, torch.Tensor]]) -> None:
        self.rows = [dict(r) for r in history.get("rows", [])]
        self.pending = list(history.get("pending", []))
        self.selection.load_state_dict(history.get("selection", {}))
        self.snapshots = snapshots[-self.average:] if self.average > 1 else []
