"""Choosing the step count by K-fold cross-validation: an orchestration over ordinary runs of the one loop.

    from sdtune.training.crossval import cross_validate
    result = cross_validate(TrainConfig(method="lora", data="data/heart", out="runs/heart", steps=600,
                                        save_every=50, cv_folds=5))
    result.recommended_step                  # then: train(config.replace(cv_folds=0, steps="auto"))

Why: with 5-20 images one held-out split is noise (which images are held out moves the minimum of the curve more
than training does). Each of the K fold runs holds out one fold (a seeded partition of the distinct images:
`training.folds.fold_of`) as its validation set and trains on the rest, in OUT/cv/fold-k/, an ordinary run folder
(config, log, summary, state). OUT/cv/report.json gets, per checkpoint step, the mean, standard deviation and
standard error over the folds of every numeric metric (validation loss; the judge's with `judge`), and the
recommended step by the one-standard-error rule (`training.folds`, where the choice is argued). `steps="auto"`
then trains on all images to that step (`training.folds.resolve_auto_steps`).

* Latents: the folds share one `LatentStore`, so every image is encoded by the VAE once for all K folds (the
  validation images of one fold are the training images of the others). DreamBooth/LoRA class images generated
  for prior preservation are shared through OUT/cv/class_images (generated once, still encoded once per fold).
* Resumable: a fold is a run with `resume="auto"`; a rerun skips folds that finished (their summary says so) and
  continues an interrupted one. A fold trained with other settings is refused, so a report never mixes runs.
* Cost: K runs of `steps` each, less the K-1 latent encodings shared (bench/crossval_cost.py measures it).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdtune.atomic import write_atomic
from sdtune.errors import SdtuneError
from sdtune.training.config import TrainConfig
from sdtune.training.config_checks import parse_select_by
from sdtune.training.folds import REPORT, aggregate, format_report, recommend
from sdtune.training.latents import LatentStore
from sdtune.training.loop import Trainer, TrainResult
from sdtune.training.sampling import Evaluator


@dataclass
class CVResult:
    out: Path                                   # OUT/cv
    report: dict[str, Any]                      # as written to OUT/cv/report.json
    stopped: str                                # finished | interrupted
    folds: list[TrainResult | None] = field(default_factory=list)  # None: finished before, skipped
    latents_encoded: int = 0                    # images the VAE encoded in this process, for all folds together

    @property
    def recommended_step(self) -> int | None:
        return (self.report.get("recommendation") or {}).get("step")

    @property
    def table(self) -> str:
        return format_report(self.report)


def check_cv_data(config: TrainConfig) -> int:
    """The number of image files in the data folder, refusing cv_folds above it (one line, before any work)."""
    from sdtune.training.data import list_images

    assert config.data is not None  # check_paths requires it
    n = len(list_images(config.data)[1].images)
    if config.cv_folds > n:
        raise SdtuneError(f"cv_folds {config.cv_folds} is more than the {n} image(s) in {config.data}; use 2..{n} "
                          "folds")
    return n


class CrossValidation:
    """The K fold runs of one config (see the module docstring); `run()` returns a `CVResult`.

    model: a loaded model; each fold trains a deep copy, so every fold starts from the same weights (default: each
    fold loads `config.model`). evaluator, on_step, handle_signals, echo: as `Trainer`'s, for every fold."""

    def __init__(self, config: TrainConfig, *, model: Any = None, evaluator: Evaluator | None = None,
                 on_step: Callable[[Trainer, int, float], None] | None = None, handle_signals: bool = True,
                 echo: Callable[[str], None] | None = None, latent_store: LatentStore | None = None) -> None:
        self.config = config
        self.model = model
        self.evaluator = evaluator
        self.on_step = on_step
        self.handle_signals = handle_signals
        self._echo = echo
        self.store = latent_store if latent_store is not None else LatentStore(flip=config.flip > 0)
        self.trainer: Trainer | None = None
        self._stop = False

    def echo(self, text: str) -> None:
        if self._echo is not None:
            self._echo(text)
        else:
            import sys

            print(text, file=sys.stderr, flush=True)

    def request_stop(self) -> None:
        """Stop the running fold after its current step (state saved) and start no other."""
        self._stop = True
        if self.trainer is not None:
            self.trainer.request_stop("interrupted")

    # ------------------------------------------------------------------------------------------------ the run

    def run(self) -> CVResult:
        cfg = self.config
        cfg.check_values()
        if cfg.cv_folds < 2 or cfg.cv_fold is not None:
            raise SdtuneError("cross_validate needs cv_folds >= 2 (and no cv_fold): set --cv-folds K")
        cfg.check_paths(model=self.model is None)
        n_files = check_cv_data(cfg)
        cv = cfg.out_dir / "cv"
        folds = [self._fold_config(k) for k in range(cfg.cv_folds)]
        done = [self._finished(f) for f in folds]  # every fold's settings checked before any trains
        cv.mkdir(parents=True, exist_ok=True)
        cfg.replace(resume=None).write(cv)
        if not (cfg.out_dir / "state").exists():  # the run folder's own config (the UI lists and resumes it)
            cfg.replace(resume=None).write(cfg.out_dir)
        previous = self._previous_report(cv)
        held: list[list[str] | None] = [(previous.get(k) or {}).get("held_out") for k in range(cfg.cv_folds)]
        results: list[TrainResult | None] = []
        stopped = "finished"
        for k, fcfg in enumerate(folds):
            if done[k]:
                self.echo(f"cross-validation fold {k + 1}/{cfg.cv_folds}: finished before, skipped ({fcfg.out})")
                results.append(None)
                continue
            if self._stop:
                stopped = "interrupted"
                break
            self._share_class_images(cv, Path(str(fcfg.out)))
            self.echo(f"cross-validation fold {k + 1}/{cfg.cv_folds} ({fcfg.out})")
            self.trainer = Trainer(fcfg, model=copy.deepcopy(self.model) if self.model is not None else None,
                                   evaluator=self.evaluator, on_step=self.on_step,
                                   handle_signals=self.handle_signals, echo=self._echo, latent_store=self.store)
            try:
                result = self.trainer.run()
                held[k] = [it.rel for it in self.trainer.val_items]
            finally:
                self.trainer = None
            results.append(result)
            if result.stopped == "interrupted" or self._stop:
                stopped = "interrupted"
                self._write_report(cv, folds, held, n_files)
                break
            self._write_report(cv, folds, held, n_files)
        report = self._write_report(cv, folds, held, n_files)
        if stopped == "interrupted":
            self.echo(f"cross-validation stopped after {report['folds_done']} of {cfg.cv_folds} folds; rerun the "
                      "same command to continue")
        return CVResult(out=cv, report=report, stopped=stopped, folds=results, latents_encoded=self.store.encoded)

    # ------------------------------------------------------------------------------------------------ folds

    def _fold_config(self, k: int) -> TrainConfig:
        cfg = self.config
        return cfg.replace(cv_fold=k, out=str(cfg.out_dir / "cv" / f"fold-{k}"), resume="auto")

    def _finished(self, fcfg: TrainConfig) -> bool:
        """True when the fold's run reached `steps` and wrote its result; refuses a fold run with other settings."""
        from sdtune.training.setup import RESUME_FREE

        folder = Path(str(fcfg.out))
        saved = _read_json(folder / "config.json")
        if not isinstance(saved, dict):
            return False
        now = fcfg.replace(resume=None).to_dict()
        changed = [k for sec, values in now.items() if isinstance(values, dict)
                   for k, v in values.items() if k not in RESUME_FREE and isinstance(saved.get(sec), dict)
                   and k in saved[sec] and saved[sec][k] != v]
        if changed:
            raise SdtuneError(f"{folder} was trained with other settings ({', '.join(changed)}); rerun with those, "
                              "or use another --out")
        summary = _read_json(folder / "summary.json")
        return isinstance(summary, dict) and bool(summary.get("final")) \
            and int(summary.get("step") or 0) >= fcfg.total_steps

    def _share_class_images(self, cv: Path, fold: Path) -> None:
        """Prior preservation's generated class images: one cache (OUT/cv/class_images) for every fold."""
        options = self.config.options
        if not hasattr(options, "num_class_images") or getattr(options, "class_data", None):
            return
        link = fold / "class_images"
        if link.exists() or link.is_symlink():
            return
        try:
            (cv / "class_images").mkdir(parents=True, exist_ok=True)
            fold.mkdir(parents=True, exist_ok=True)
            os.symlink(cv / "class_images", link, target_is_directory=True)
        except OSError:
            pass  # no symlinks here (some Windows setups): each fold generates its own

    # ------------------------------------------------------------------------------------------------ report

    @staticmethod
    def _previous_report(cv: Path) -> dict[int, dict[str, Any]]:
        doc = _read_json(cv / "report.json")
        folds = doc.get("per_fold", []) if isinstance(doc, dict) else []
        return {int(f["fold"]): f for f in folds if isinstance(f, dict) and isinstance(f.get("fold"), int)}

    def _write_report(self, cv: Path, folds: list[TrainConfig], held: list[list[str] | None],
                      n_files: int) -> dict[str, Any]:
        from sdtune.training.runlog import read_log

        cfg = self.config
        metric, mode = parse_select_by(cfg.select_by)
        per_fold: list[dict[str, Any]] = []
        finished_rows: list[list[dict[str, Any]]] = []
        for k, fcfg in enumerate(folds):
            folder = Path(str(fcfg.out))
            summary = _read_json(folder / "summary.json")
            if not isinstance(summary, dict):
                continue
            rows = [{n: v for n, v in r.items() if n not in ("file", "best")} for r in summary.get("checkpoints", [])]
            base = next((r.get("val_loss") for r in read_log(folder / "log.jsonl") if r.get("event") == "baseline"),
                        None)
            if base is not None:
                rows = [{"step": 0, "val_loss": base}] + rows
            finished = bool(summary.get("final")) and int(summary.get("step") or 0) >= fcfg.total_steps
            per_fold.append({"fold": k, "out": f"fold-{k}", "held_out": held[k], "finished": finished,
                             "step": summary.get("step"), "rows": rows})
            if finished:
                finished_rows.append(rows)
        complete = len(finished_rows) == len(folds)
        steps = aggregate(finished_rows)
        sizes = [len(h) for h in held if h is not None]
        report: dict[str, Any] = {
            "method": cfg.method, "folds": cfg.cv_folds, "folds_done": len(finished_rows), "complete": complete,
            "images": sum(sizes) if len(sizes) == len(folds) else n_files, "steps_per_fold": cfg.total_steps,
            "metric": metric, "mode": mode, "rule": "earliest checkpoint within one standard error of the best "
            "mean over folds (training.folds)",
            "recommendation": recommend(steps, metric, mode) if complete else None,
            "steps": steps, "per_fold": per_fold, "latents_encoded_this_process": self.store.encoded,
            "config": cfg.replace(resume=None).to_dict()}
        write_atomic(cfg.out_dir / REPORT, json.dumps(report, indent=2) + "\n")
        return report


def cross_validate(config: TrainConfig, **kwargs: Any) -> CVResult:
    """Run the K folds of `config` (see `CrossValidation` for the keyword arguments)."""
    return CrossValidation(config, **kwargs).run()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
