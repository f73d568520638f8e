"""One job at a time on the device: a FIFO queue and its single worker thread.

Generation requests and training runs are `Job`s. The worker runs them strictly in submission order, so the model is
only ever touched by one thread, 50 concurrent txt2img requests come back in order with the images each would give
alone, and a training run makes generation wait with a visible status (`JobQueue.snapshot()`). HTTP handlers await
`job.future` without holding a thread.

A job reports progress into `job.progress` (what `/sdapi/v1/progress` shows) and watches `job.control`:
`interrupt()` stops it as soon as it can (generation: the current image is returned as it is; training: the state
is saved and the run can be resumed), `skip()` drops the current image and goes on with the next batch.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from sdtune.errors import SdtuneError

MAX_QUEUED = 200      # waiting jobs; more is refused (HTTP 503) rather than kept in memory
MAX_REMEMBERED = 100  # finished jobs kept for status queries


class QueueFull(SdtuneError):
    """Too many jobs are waiting."""


@dataclass
class JobControl:
    """Flags a running job checks between steps (set from request threads)."""

    interrupted: bool = False
    skipped: bool = False
    on_interrupt: Callable[[], None] | None = None  # e.g. Trainer.request_stop

    def interrupt(self) -> None:
        self.interrupted = True
        if self.on_interrupt is not None:
            self.on_interrupt()

    def skip(self) -> None:
        self.skipped = True


@dataclass
class JobProgress:
    step: int = 0
    total: int = 0
    batches: int = 1  # a txt2img job's n_iter: `total` spans them all (A1111 reports job_no of job_count)
    started: float | None = None
    text: str = ""
    # the latest intermediate state and how to turn it into a PNG; decoded only when someone asks (/progress),
    # so a generation nobody watches pays nothing for previews
    preview_source: Any = None
    preview_decoder: Callable[[Any], bytes | None] | None = None
    _preview: tuple[int, bytes | None] = (-1, None)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def preview_png(self) -> bytes | None:
        source, decode = self.preview_source, self.preview_decoder
        if source is None or decode is None:
            return None
        with self._lock:
            if self._preview[0] != id(source):
                self._preview = (id(source), decode(source))
            return self._preview[1]

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    @property
    def eta(self) -> float:
        """Seconds left, from the time per step so far (A1111's eta_relative)."""
        if not self.started or not self.step or not self.total:
            return 0.0
        spent = time.time() - self.started
        return max(0.0, spent / self.step * (self.total - self.step))


@dataclass
class Job:
    kind: str                       # "txt2img" | "train"
    title: str
    run: Callable[["Job"], Any]     # the work; runs on the worker thread
    id: str = ""
    status: str = "queued"          # queued | running | done | failed | interrupted
    created: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    progress: JobProgress = field(default_factory=JobProgress)
    control: JobControl = field(default_factory=JobControl)
    future: Future = field(default_factory=Future)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "title": self.title, "status": self.status,
                "step": self.progress.step, "total": self.progress.total, "error": self.error,
                "created": self.created, "finished": self.finished}


class JobQueue:
    """The FIFO of jobs and the worker thread that runs them (started on first submit)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self.current: Job | None = None
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    def submit(self, job: Job) -> Job:
        with self._lock:
            waiting = sum(1 for j in self.jobs.values() if j.status == "queued")
            if waiting >= MAX_QUEUED:
                raise QueueFull(f"{waiting} jobs are waiting; try again when the queue is shorter")
            job.id = f"{job.kind}-{next(self._ids)}"
            self.jobs[job.id] = job
            self._forget_old()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="sdtune-jobs", daemon=True)
                self._worker.start()
        self._queue.put(job)
        return job

    def _forget_old(self) -> None:
        done = [k for k, j in self.jobs.items() if j.status not in ("queued", "running")]
        for k in done[:max(0, len(done) - MAX_REMEMBERED)]:
            del self.jobs[k]

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.control.interrupted:  # interrupted while waiting: never started
                job.status, job.finished = "interrupted", time.time()
                job.future.set_exception(SdtuneError("interrupted before it started"))
                continue
            self.current = job
            job.status = "running"
            job.progress.started = time.time()
            result: Any = None
            failure: BaseException | None = None
            try:
                result = job.run(job)
            except BaseException as exc:  # noqa: BLE001 - reported to whoever waits on the job
                failure = exc
                job.status = "failed"
                job.error = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
            else:
                job.status = "interrupted" if job.control.interrupted else "done"
            # the job's record is complete before its waiter wakes (a request that returns sees it finished)
            job.finished = time.time()
            self.current = None
            if failure is not None:
                job.future.set_exception(failure)
            else:
                job.future.set_result(result)

    async def run(self, kind: str, title: str, fn: Callable[[Job], Any]) -> Any:
        """Queue `fn` as a job and wait for its result without holding a thread (for request handlers)."""
        import asyncio

        return await asyncio.wrap_future(self.submit(Job(kind=kind, title=title, run=fn)).future)

    def interrupt_all(self) -> None:
        """A1111's interrupt: stop the running job; waiting jobs still run (A1111 interrupts only the current)."""
        job = self.current
        if job is not None:
            job.control.interrupt()

    def skip(self) -> None:
        job = self.current
        if job is not None:
            job.control.skip()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            jobs = list(self.jobs.values())
        return {"current": self.current.describe() if self.current else None,
                "queued": [j.describe() for j in jobs if j.status == "queued"],
                "recent": [j.describe() for j in jobs if j.status not in ("queued", "running")][-20:]}

    def stop(self, timeout: float = 120.0) -> None:
        """Server shutdown: interrupt the running job (a training run saves its state), drop the waiting ones, and
        wait for the worker so the state is written before the process exits."""
        for job in list(self.jobs.values()):
            if job.status == "queued":
                job.control.interrupt()
        self.interrupt_all()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout)
