"""Seeing what a run does: a JSONL record of every step and event (OUT/log.jsonl), a tqdm progress bar,
TensorBoard scalars when `tensorboard` is installed, and the checkpoint summary (summary.csv / summary.json and
a printed table).

On resume the JSONL log is cut back to the resumed step and the earlier session's `end` record is dropped: a
`resume` record marks where the new session starts, and a log holds at most one `end`, the last session's. So the
log reads as one run with its stops and resumes, and `run_outcome` (the UI's progress of a run launched as several
processes, summaries) sees the final state, never a session that was continued afterwards.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from sdtune.atomic import write_atomic


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL log; a torn last line (a crash mid-write) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return parse_records(text.splitlines())


def parse_records(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """The JSON objects among `lines`; a line that is not one (torn, or foreign) is skipped."""
    out: list[dict[str, Any]] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def last_record(path: str | Path, tail_bytes: int = 16384) -> dict[str, Any] | None:
    """The log's last complete record, read from its tail only (a long run's log is not parsed whole)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    if size > tail_bytes:
        lines = lines[1:]  # the first one may be cut
    records = parse_records(lines)
    return records[-1] if records else None


def run_outcome(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The `end` record of the run's latest session, or None while that session runs (or if it was killed): an
    `end` before a later `resume` belongs to a session that was continued, so it does not count (logs written
    before resumes dropped it)."""
    outcome: Mapping[str, Any] | None = None
    for rec in records:
        if rec.get("event") == "end":
            outcome = rec
        elif rec.get("event") == "resume":
            outcome = None
    return outcome


def step_losses(path: str | Path) -> list[float]:
    """The per-step training losses of a run, in step order."""
    return [r["loss"] for r in read_log(path) if r.get("event") == "step"]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLog:
    """Writes the run's JSONL log, progress bar and TensorBoard scalars."""

    def __init__(self, out: Path, *, total_steps: int, start_step: int = 0, progress: bool = True,
                 tensorboard: bool = True, echo: Callable[[str], None] | None = None) -> None:
        self.path = out / "log.jsonl"
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if start_step > 0:
            # the steps after the resumed state are redone; the previous session's `end` is not the run's end
            kept = [r for r in read_log(self.path) if int(r.get("step", 0)) <= start_step and r.get("event") != "end"]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        if start_step > 0:
            self.write({"event": "resume", "step": start_step})
        self._t0 = time.time()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
            except Exception:  # tensorboard not installed (ImportError) or unusable: the JSONL log is enough
                self.tb = None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr, disable=None,
                            dynamic_ncols=True, leave=True)

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def step(self, step: int, loss: float, lr: float, **extra: Any) -> None:
        rec = {"event": "step", "step": step, "loss": loss, "lr": lr, "time": round(time.time() - self._t0, 4),
               **extra}
        self.write(rec)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def event(self, kind: str, step: int, **data: Any) -> None:
        self.write({"event": kind, "step": step, **data})
        if self.tb is not None:
            for k, v in data.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def message(self, text: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr)
        else:
            self.echo(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if not self._file.closed:
            self._file.close()


# ------------------------------------------------------------------------------------------------ summary

def summary_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = ["step", "train_loss", "val_loss"]
    for r in rows:
        for k in r:
            if k not in cols and k not in ("file", "best"):
                cols.append(k)
    return cols + ["file", "best"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "*" if value else ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of the checkpoints (best marked with *)."""
    if not rows:
        return "(no checkpoints)"
    cols = summary_columns(rows)
    cells = [[c for c in cols]] + [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_summary(out: Path, rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> None:
    """summary.csv (one row per evaluated checkpoint) and summary.json (rows + run facts), atomically."""
    cols = summary_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    write_atomic(out / "summary.csv", buf.getvalue())
    doc = {**info, "checkpoints": [{k: _json_safe(v) for k, v in r.items()} for r in rows]}
    write_atomic(out / "summary.json", json.dumps(doc, indent=2) + "\n")


class SilentLog(RunLog):
    """The log of a process that is not the run's main one (`training.distributed`): it writes and prints nothing,
    so a run of N processes leaves one log, one progress bar and one copy of every message."""

    def __init__(self) -> None:  # noqa: D107 - nothing to open
        self.tb = None
        self.bar = None

    def write(self, record: Mapping[str, Any]) -> None:
        pass

    def step(self, step: int, loss: float, lr: float, **extra: Any) -> None:
        pass

    def event(self, kind: str, step: int, **data: Any) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
