"""Training runs for the server: start one from a `TrainConfig` (the same schema as the CLI and TOML), queue it
as a job, and read a run folder back (config, losses, checkpoints and their metrics, sample grids).

A run is a folder `RUNS/<name>/` written by the training loop exactly as `sdtune train` writes it, so a run
started in the UI can be resumed with the CLI and the other way round.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from sdtune.errors import NotFound, SdtuneError
from sdtune.server.folders import ModelFolders, PathRefused
from sdtune.server.jobs import Job, JobQueue

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_LOG_POINTS = 2000  # losses returned per run (evenly thinned beyond this)

# what each method is for (the seed articles' guidance), shown on the Train page
METHOD_GUIDANCE = {
    "ti": "Textual Inversion: a new word (a few vectors) for an object, character or feature, from 3-20 images. "
          "Tiny files; several per prompt; weighted like any word.",
    "hypernetwork": "Hypernetwork: small networks on attention's keys and values, for a drawing style, from many "
                    "images of that style.",
    "lora": "LoRA: low-rank weight deltas for a character, pose or style, from ~30 images. Small files, "
            "combined with weights, merged into checkpoints.",
    "dreambooth": "DreamBooth: fine-tunes the whole UNet on 10-20 images of a subject with an identifier (sks) and "
                  "class-prior preservation. Highest fidelity, a full checkpoint.",
}


# the measured recipes of the README and docs/, as starting points on the Train page (flat fields; the method's own
# options under the method's name, as in a TOML file)
PRESETS: dict[str, list[dict[str, Any]]] = {
    "ti": [{"name": "toy world: <star> from 5-20 images (README)",
            "values": {"steps": 300, "lr": "5e-3", "flip": 0.5,
                       "ti": {"token": "<star>", "init": "shape", "vectors": 2, "templates": "object"}}}],
    "hypernetwork": [{"name": "toy world: outline style (README)",
                      "values": {"steps": 600, "lr": "2e-3", "batch_size": 8, "caption_dropout": 0.0,
                                 "average_checkpoints": 3,
                                 "hypernetwork": {"activation": "relu", "keep_uncond": 0.5}}}],
    "lora": [{"name": "toy world: a new shape, rank 8 (README)",
              "values": {"steps": 800, "lr": "1e-3", "batch_size": 4,
                         "lora": {"rank": 8, "alpha": 8, "targets": ["attn", "ff", "conv"]}}}],
    "dreambooth": [{"name": "photos of a subject, lr 2e-6 (README)",
                    "values": {"lr": "2e-6", "dreambooth": {"prompt": "a photo of sks dog",
                                                            "class_prompt": "a photo of a dog"}}}],
}


def check_run_name(name: str) -> str:
    if not isinstance(name, str) or not RUN_NAME.match(name) or name in (".", ".."):
        raise SdtuneError(f"run name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (starting with a letter or "
                          "digit)")
    return name


def confined_data(folders: ModelFolders, value: str) -> Path:
    """A dataset folder named in a request: relative to (or inside) one of the dataset roots."""
    from sdtune.server.folders import confine

    p = Path(value).expanduser()
    for root in folders.datasets:
        if p.is_absolute():
            resolved = p.resolve()
            if resolved == root.resolve() or root.resolve() in resolved.parents:
                return resolved
        else:
            try:
                return confine(root, value)
            except PathRefused:
                continue
    raise PathRefused(f"data folder {value!r} is outside the dataset folders "
                      f"({', '.join(str(r) for r in folders.datasets)}); start `sdtune ui --datasets DIR`")


def sectioned(method: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A request's settings in the TOML layout: flat field names go to their section (a flat `data` would read as
    the [data] table), the method's table and section tables pass through; `out` is the server's to choose."""
    from sdtune.training.config import TrainConfig
    from sdtune.training.options import SECTIONS

    section_of = {f.name: f.metadata["section"] for f in TrainConfig.fields()}
    doc: dict[str, Any] = {"method": method}
    for key, value in values.items():
        if key in ("method", "out"):
            continue
        if key in section_of and not (key in SECTIONS and isinstance(value, Mapping)):
            doc.setdefault(section_of[key], {})[key] = value
        elif isinstance(value, Mapping):
            doc.setdefault(key, {}).update({k: v for k, v in value.items() if k != "out"})
        else:
            doc[key] = value  # unknown: TrainConfig names it in its error
    return doc


def build_config(folders: ModelFolders, engine: Any, method: str, name: str, values: Mapping[str, Any]) -> Any:
    """The TrainConfig a request asks for: its values on the method's defaults, the output folder set to
    RUNS/<name>, the data folder and model confined to the configured folders."""
    from sdtune.training.config import TrainConfig
    from sdtune.training.methods import get_method

    get_method(method)
    check_run_name(name)
    cfg = TrainConfig.from_dict(sectioned(method, values), source="request", base=TrainConfig(method=method))
    updates: dict[str, Any] = {"out": str(folders.runs / name), "progress": False}
    if cfg.data:
        from sdtune.training.data import list_images

        updates["data"] = str(confined_data(folders, cfg.data))
        list_images(updates["data"])  # an empty folder: refused now, not as a failed job (files listed, not read)
    if cfg.val_dir:
        updates["val_dir"] = str(confined_data(folders, cfg.val_dir))
    updates["model"] = engine.resolve_checkpoint(cfg.model)[1]
    if cfg.vae:
        updates["vae"] = engine.resolve_vae(cfg.vae)
    cfg = cfg.replace(**updates)
    cfg.check_values()
    return cfg


class RunRegistry:
    """Which run each training job belongs to, so Stop and Resume can find it."""

    def __init__(self, folders: ModelFolders, jobs: JobQueue,
                 evaluator_for: Callable[[Any], Any] | None = None) -> None:
        self.folders, self.jobs = folders, jobs
        self.evaluator_for = evaluator_for
        self.job_of: dict[str, Job] = {}
        self.method_of: dict[str, str] = {}  # a started run's method, before its config.json is written

    def start(self, config: Any, *, resume: bool = False, processes: int = 1) -> Job:
        """Queue a run: in the worker thread (1 process) or launched as `processes` processes (`server.launch`)."""
        from sdtune.server.launch import check_processes, run_launched
        from sdtune.training.loop import Trainer

        processes = check_processes(processes, config)
        name = Path(config.out).name
        existing = self.job_of.get(name)
        if existing is not None and existing.status in ("queued", "running"):
            raise SdtuneError(f"run {name!r} is already {existing.status}; stop it first")
        if not resume and (Path(config.out) / "state").exists():
            raise SdtuneError(f"run {name!r} already exists; resume it, or choose another name")
        from sdtune.training.crossval import CrossValidation, check_cv_data
        from sdtune.training.folds import resolve_auto_steps

        config = config.replace(resume="auto") if resume and not config.cv_folds else config
        config.check_paths()
        if config.judge and self.evaluator_for is None:
            raise SdtuneError("this server has no judge evaluator; start it with `sdtune ui`")
        evaluator = self.evaluator_for(config) if self.evaluator_for is not None else None
        if config.cv_folds and processes > 1:
            raise SdtuneError("cross-validation runs in one process; set processes to 1 or drop cv_folds")
        if config.cv_folds:  # K fold runs in RUNS/<name>/cv (each resumes itself), then a report
            check_cv_data(config)
        config = resolve_auto_steps(config)  # steps auto: the cross-validated step of RUNS/<name>/cv/report.json
        steps, folds = config.total_steps, max(1, config.cv_folds)

        def work(job: Job) -> Any:
            if processes > 1:
                return run_launched(job, config, processes, resume=resume)
            echo = lambda text: setattr(job.progress, "text", text)  # noqa: E731
            progress = lambda t, step, loss: _on_step(job, (t.config.cv_fold or 0) * steps + step,  # noqa: E731
                                                      folds * steps)
            runner: Any = (CrossValidation(config, evaluator=evaluator, handle_signals=False, echo=echo,
                                           on_step=progress) if config.cv_folds else
                           Trainer(config, evaluator=evaluator, handle_signals=False, echo=echo, on_step=progress))
            stop = runner.request_stop
            job.control.on_interrupt = lambda: stop()
            if job.control.interrupted:
                stop()
            return runner.run()

        title = f"cross-validate {config.method} {name} ({folds} folds)" if config.cv_folds else \
            f"train {config.method} {name}" + (f" ({processes} processes)" if processes > 1 else "")
        job = self.jobs.submit(Job(kind="train", title=title, run=work))
        job.progress.total = folds * steps
        self.job_of[name], self.method_of[name] = job, config.method
        return job

    def stop(self, name: str) -> None:
        job = self.job_of.get(name)
        if job is None or job.status not in ("queued", "running"):
            raise SdtuneError(f"run {name!r} is not running")
        job.control.interrupt()

    def status(self, name: str) -> str | None:
        job = self.job_of.get(name)
        return job.status if job is not None else None

    def with_started(self, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The runs list plus the runs this server started whose folder has no config.json yet (queued, or
        preparing), by name."""
        names = {r["name"] for r in listed}
        started = [{"name": n, "method": m, "step": None, "steps": None, "final": None, "best_step": None}
                   for n, m in self.method_of.items() if n not in names]
        return sorted(listed + started, key=lambda r: r["name"])


# where "use in Generate" puts a checkpoint of each method, and the prompt text that uses it
USE_FOLDER = {"lora": "lora", "ti": "embeddings", "hypernetwork": "hypernetwork", "dreambooth": "ckpt"}


def use_checkpoint(folders: ModelFolders, name: str, step: int) -> dict[str, Any]:
    """Put checkpoint `step` of run `name` where Generate finds it (the configured LoRA, embeddings, hypernetwork
    or checkpoint folder) as `<run>-<step>.<ext>`, a hard link when possible; returns what to put in the prompt."""
    from sdtune.server.folders import confine
    from sdtune.training.checkpoint import link_or_copy

    folder = confine(folders.runs, check_run_name(name))
    doc = read_run(folder)
    method = (doc.get("config") or {}).get("method")
    row = next((r for r in doc["rows"] if r.get("step") == step), None)
    if row is None or not row.get("file"):
        raise SdtuneError(f"run {name!r} has no checkpoint file of step {step} (kept: "
                          f"{', '.join(str(r['step']) for r in doc['rows'] if r.get('file')) or 'none'})")
    kind = USE_FOLDER.get(str(method))
    target_dir = getattr(folders, kind) if kind else None
    if target_dir is None:
        option = {"lora": "--lora-dir", "embeddings": "--embeddings-dir", "hypernetwork": "--hypernetwork-dir",
                  "ckpt": "--ckpt-dir"}.get(kind or "", "a model folder")
        raise SdtuneError(f"no folder for {method} files is configured; start `sdtune ui` with {option}")
    src = confine(folder, row["file"])
    stem = f"{name}-{step}"
    dst = Path(target_dir) / f"{stem}{src.suffix}"
    link_or_copy(src, dst)
    use = {"lora": f"<lora:{stem}:1>", "ti": stem, "hypernetwork": f"<hypernet:{stem}:1>"}.get(str(method), "")
    return {"file": str(dst), "prompt": use, "checkpoint": stem if method == "dreambooth" else None}


def _on_step(job: Job, step: int, total: int) -> None:
    job.progress.step, job.progress.total = step, total


def read_run(folder: Path, started: bool = False) -> dict[str, Any]:
    """Everything the run page shows, read from the files the loop writes (none yet for a `started` run)."""
    if not folder.is_dir() and not started:
        raise NotFound(f"no run {folder.name!r}")
    config = _read_json(folder / "config.json")
    summary = _read_json(folder / "summary.json")
    losses: list[list[float]] = []
    val: list[list[float]] = []
    events: list[dict[str, Any]] = []
    log = folder / "log.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run
            if rec.get("event") == "step" and isinstance(rec.get("loss"), (int, float)):
                losses.append([rec["step"], rec["loss"]])
            elif rec.get("event") == "checkpoint" and isinstance(rec.get("val_loss"), (int, float)):
                val.append([rec["step"], rec["val_loss"]])
            elif rec.get("event") not in ("step",):
                events.append({k: rec.get(k) for k in ("event", "step", "stopped", "final", "file") if k in rec})
    if len(losses) > MAX_LOG_POINTS:
        stride = len(losses) / MAX_LOG_POINTS
        losses = [losses[int(i * stride)] for i in range(MAX_LOG_POINTS)] + [losses[-1]]
    samples = sorted(p.relative_to(folder).as_posix() for p in (folder / "samples").glob("*.png")) \
        if (folder / "samples").is_dir() else []
    return {"name": folder.name, "config": config, "summary": summary, "losses": losses, "val_losses": val,
            "events": events[-50:], "samples": samples, "rows": (summary or {}).get("checkpoints", []),
            "cv": _read_json(folder / "cv" / "report.json")}


# a run's `end` record -> the status its job showed (TrainingDiverged fails the job)
ENDED = {"interrupted": "interrupted", "diverged": "failed"}


def ended_status(folder: Path, final: Any) -> str:
    """The status of a run no job of this server holds (one from before a restart), in the words its job used:
    "done" when it wrote its final file, else its log's last `end` record ("interrupted", "failed"), else
    "stopped" (killed, or ended before it logged anything)."""
    from sdtune.training.runlog import last_record

    if final:
        return "done"
    last = last_record(folder / "log.jsonl") or {}
    return ENDED.get(str(last.get("stopped")), "stopped") if last.get("event") == "end" else "stopped"


def list_runs(runs: Path) -> list[dict[str, Any]]:
    if not runs.is_dir():
        return []
    out = []
    for d in sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (d / "config.json").is_file():
            continue
        config = _read_json(d / "config.json") or {}
        summary = _read_json(d / "summary.json") or {}
        out.append({"name": d.name, "method": config.get("method"), "step": summary.get("step"),
                    "steps": summary.get("steps"), "final": summary.get("final"),
                    "best_step": summary.get("best_step")})
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
