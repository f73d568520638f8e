"""Recipes through the training API: `sdtune recipe wrong-lora` as a job (`POST /sdtune/v1/recipes/wrong-lora`).

The job runs the same `run_wrong_lora` as the CLI into `RUNS/<name>/` (the configured runs folder, like training
runs), so a recipe started here continues from the command line with `--out RUNS/<name>` and the other way round
(the recipe resumes stage by stage; `recipe.json` holds the settings the images and the LoRA depend on). Its
messages are the job's progress; the result (`compare/report.json`, the grid, `wrong.safetensors`) is read back
by `GET /sdtune/v1/recipes/wrong-lora/{name}` and its files through `GET /sdtune/v1/runs/{name}/file`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from sdtune.errors import NotFound, SdtuneError
from sdtune.server.folders import ModelFolders, confine
from sdtune.server.jobs import Job, JobQueue
from sdtune.server.runs import check_run_name

MAX_MESSAGES = 200


def wrong_lora_settings(folders: ModelFolders, engine: Any, name: str, model: str | None,
                        values: Mapping[str, Any],
                        defaults: Callable[[Any, set[str]], Any] | None) -> tuple[Any, Any]:
    """(WrongLoraSettings, evaluator) a request asks for: out = RUNS/<name>, the model confined to the checkpoint
    folder, the model's defaults for what the request left out, everything checked before the job queues."""
    from sdtune.recipes.wrong_lora import WrongLoraSettings, train_config

    check_run_name(name)
    out = folders.runs / name
    if out.exists() and not (out / "recipe.json").is_file() and any(out.iterdir()):
        raise SdtuneError(f"{name!r} is a run that is not a wrong-lora recipe; choose another name")
    spec = engine.resolve_checkpoint(model or engine.options["sd_model_checkpoint"])[1]
    s = WrongLoraSettings(out=str(out), model=spec)
    for key, value in values.items():
        if key in ("out", "model") or not hasattr(s, key):
            known = ", ".join(sorted(k for k in vars(s) if k not in ("out", "model")))
            raise SdtuneError(f"unknown recipe setting {key!r}; use one of {known}")
        _check_type(key, value, getattr(s, key))
        setattr(s, key, list(value) if isinstance(value, (list, tuple)) else value)
    evaluate = defaults(s, set(values)) if defaults is not None else None
    s.validate()
    # unknown, mistyped or out-of-range training settings: refused now, before recipe.json pins them to the folder
    train_config(s, out / "bad_images", out / "train").check_values()
    return s, evaluate


def _check_type(key: str, value: Any, default: Any) -> None:
    """A number where the setting's default is one (JSON null from an empty field, or a string, is refused in one
    line instead of failing inside validate())."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return
    ok = isinstance(value, int) if isinstance(default, int) else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        kind = "a whole number" if isinstance(default, int) else "a number"
        raise SdtuneError(f"recipe setting {key!r} {value!r} must be {kind} (default {default})")


class RecipeRegistry:
    """Which job each recipe folder belongs to (one at a time per folder)."""

    def __init__(self, jobs: JobQueue) -> None:
        self.jobs = jobs
        self.job_of: dict[str, Job] = {}
        self.messages: dict[str, list[str]] = {}

    def start(self, settings: Any, evaluate: Any) -> Job:
        from sdtune.recipes.wrong_lora import run_wrong_lora

        name = Path(settings.out).name
        existing = self.job_of.get(name)
        if existing is not None and existing.status in ("queued", "running"):
            raise SdtuneError(f"recipe {name!r} is already {existing.status}; wait for it to end")
        messages = self.messages[name] = []

        def echo(text: str, job: Job) -> None:
            messages.extend(str(text).splitlines())
            del messages[:-MAX_MESSAGES]
            job.progress.text = str(text).strip("\n")  # the whole message: its later lines continue the first

        def work(job: Job) -> dict[str, Any]:
            try:
                result = run_wrong_lora(settings, evaluate=evaluate, echo=lambda text: echo(text, job),
                                        stop=lambda: job.control.interrupted)
            except SdtuneError as exc:
                if not job.control.interrupted:
                    raise
                echo(str(exc), job)  # stopped, resumable: the job queue marks it interrupted
                return {"stopped": True}
            return {"lora": str(result.lora), "images": result.images, "report": result.report}

        job = self.jobs.submit(Job(kind="recipe", title=f"recipe wrong-lora {name}", run=work))
        self.job_of[name] = job
        return job

    def stop(self, name: str) -> None:
        job = self.job_of.get(name)
        if job is None or job.status not in ("queued", "running"):
            raise SdtuneError(f"recipe {name!r} is not running")
        job.control.interrupt()

    def read(self, runs: Path, name: str) -> dict[str, Any]:
        folder = confine(runs, check_run_name(name))
        job = self.job_of.get(name)
        if job is None and not (folder / "recipe.json").is_file():
            raise NotFound(f"no wrong-lora recipe {name!r}")
        report = _read_json(folder / "compare" / "report.json")
        files = {key: rel for key, rel in (("lora", _lora_name(folder)), ("grid", "compare/grid.png"),
                                           ("report", "compare/report.json")) if rel and (folder / rel).is_file()}
        status = job.status if job is not None else ("done" if report is not None and "lora" in files else "stopped")
        message = "" if job is None else (f"error: {job.error}" if job.status == "failed" else job.progress.text)
        return {"name": name, "status": status, "message": message, "job": job.describe() if job else None,
                "messages": list(self.messages.get(name, [])), "settings": _read_json(folder / "recipe.json"),
                "report": report, "files": files}


def _lora_name(folder: Path) -> str | None:
    settings = _read_json(folder / "recipe.json") or {}
    trigger = settings.get("trigger")
    return f"{trigger}.safetensors" if isinstance(trigger, str) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
