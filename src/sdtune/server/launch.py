"""A training job on N processes: the server's worker thread launches `torchrun --standalone --nproc_per_node N -m
sdtune train <method> --config OUT/config.toml` and watches it, instead of running the Trainer in its own thread.

Why a subprocess: the N processes need their own Python interpreters (one per GPU, or per CPU share with gloo),
and the run must be exactly what `sdtune train` under torchrun does (docs/multi_gpu.md), so a run started in the UI
and one started from a shell are the same run, resumable by either.

The job follows the run through the files the run writes anyway: the step from `OUT/log.jsonl` (read as it
grows), the outcome from its last session's `end` record (`runlog.run_outcome`). Interrupt sends SIGTERM to the
launcher's process group: every rank stops after the same step and rank 0 saves the state once. The launcher's
own output goes to `OUT/launch.log`; a failure's last `error:` line becomes the job's error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.server.jobs import Job
from sdtune.training.runlog import parse_records

CPU_MAX_PROCESSES = 8   # gloo on CPUs: more processes than this only divides the cores further
POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 600  # SIGTERM -> the state is saved; after this the processes are killed (kill -9 is resumable)
LAUNCH_LOG = "launch.log"


def cuda_devices() -> int:
    """GPUs this server's processes can see (0 without CUDA)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for the bound
        return 0


def max_processes(device: str = "auto") -> int:
    """How many processes a run may have: one per visible GPU, or up to CPU_MAX_PROCESSES on the CPU (gloo)."""
    gpus = cuda_devices()
    if device == "cpu" or gpus == 0:
        return CPU_MAX_PROCESSES
    return gpus


def check_processes(processes: Any, config: Any) -> int:
    """The number of processes a request asks for, refused with what to do when it cannot run."""
    if isinstance(processes, bool) or not isinstance(processes, int):
        raise SdtuneError(f"processes {processes!r}: give a whole number (1 = in the server's thread)")
    if processes == 1:
        return 1
    device = str(getattr(config, "device", "auto") or "auto")
    limit = max_processes(device)
    if processes < 1 or processes > limit:
        where = f"{limit} GPU(s) are visible" if cuda_devices() and device != "cpu" else \
            f"on the CPU (gloo) at most {CPU_MAX_PROCESSES}"
        raise SdtuneError(f"processes {processes}: use 1 to {limit} ({where})")
    if device.startswith("cuda:") or device == "mps":
        raise SdtuneError(f"processes {processes} with device {device}: several processes take one GPU each "
                          "(LOCAL_RANK); set device to auto, cuda or cpu")
    return processes


def command(config: Any, processes: int, *, resume: bool) -> list[str]:
    """The launcher's command line (torchrun, through this interpreter so it is the server's own environment)."""
    toml = Path(config.out) / "config.toml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "sdtune", "train", config.method, "--config", str(toml), "--out", str(config.out), "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def recorded_processes(out: Path) -> int:
    """The number of processes the latest saved state of a run was trained with (1 when unknown): what Resume
    uses unless told otherwise, so a resumed run keeps its global batch."""
    from sdtune.training.checkpoint import StateStore

    try:
        latest = StateStore(out / "state").latest()
        doc = json.loads((latest / "state.json").read_text(encoding="utf-8")) if latest is not None else {}
        return max(1, int((doc.get("extra") or {}).get("processes", 1)))
    except (OSError, ValueError, TypeError, SdtuneError):
        return 1


class LogFollower:
    """Reads a JSONL log as it grows (only whole lines); starts over when the file is replaced (a resume cuts it
    back with an atomic rename)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.inode: int | None = None
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.offset, self.inode, self.records = 0, st.st_ino, []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        new = parse_records(chunk[:end].splitlines())
        self.records.extend(new)
        return new


def _last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors[-1][len("error:"):].strip() if errors else (lines[-1] if lines else ""))[:500]


def run_launched(job: Job, config: Any, processes: int, *, resume: bool) -> dict[str, Any]:
    """The body of a job that trains on `processes` processes (runs on the job queue's worker thread)."""
    from sdtune.training.runlog import run_outcome

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    config.replace(resume=None, progress=False).write(out)  # the TOML the launch reads (the loop rewrites it)
    src = str(Path(__file__).resolve().parents[2])  # this sdtune, whatever the server's working folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}
    follower = LogFollower(out / "log.jsonl")
    if resume:  # the previous session's log is not this session's progress until the run has cut it back
        follower.poll()
    with open(out / LAUNCH_LOG, "ab") as log:
        proc = subprocess.Popen(command(config, processes, resume=resume), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def terminate() -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # torchrun and every rank: they stop together and save once
            except ProcessLookupError:
                pass

    job.control.on_interrupt = terminate
    if job.control.interrupted:
        terminate()
    job.progress.text = f"launched {processes} processes"
    stopping_since: float | None = None
    while True:
        for rec in follower.poll():
            if rec.get("event") == "step" and isinstance(rec.get("step"), int):
                job.progress.step = rec["step"]
                loss = rec.get("loss")
                job.progress.text = f"step {rec['step']}/{config.total_steps}" + (
                    f", loss {loss:.4f}" if isinstance(loss, float) else "") + f" ({processes} processes)"
        if proc.poll() is not None:
            break
        if job.control.interrupted:
            stopping_since = stopping_since or time.time()
            if time.time() - stopping_since > STOP_GRACE_SECONDS:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(POLL_SECONDS)
    follower.poll()
    outcome = run_outcome(follower.records)
    result = {"out": str(out), "processes": processes, "returncode": proc.returncode,
              "step": job.progress.step, "stopped": (outcome or {}).get("stopped"),
              "final": (outcome or {}).get("final")}
    if proc.returncode == 0 or (job.control.interrupted and outcome is not None):
        return result  # done, or interrupted with the state saved (the job queue marks it interrupted)
    reason = _last_error(out / LAUNCH_LOG) or f"exit status {proc.returncode}"
    raise SdtuneError(f"the {processes}-process run failed: {reason} (see {out / LAUNCH_LOG})")
