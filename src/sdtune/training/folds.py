"""Cross-validation's pure parts: which images each fold holds out, the statistics over folds, the recommended step
(the one-standard-error rule) and `steps auto`, read back from OUT/cv/report.json.

A leaf beside the loop: the loop's data preparation asks `fold_of` which items a fold run holds out, and `Trainer.run`
resolves `steps auto` with `resolve_auto_steps`; the orchestration over fold runs (`training.crossval`) imports the
loop, so these live here to keep the imports one-way.

Why the one-standard-error rule. With a handful of images the validation curve of one held-out split is noise, and
even the mean over K folds has a flat, noisy bottom: the step of the lowest mean moves by hundreds of steps between
seeds while the means near it differ by less than their own uncertainty. The rule of Breiman et al. (CART, 1984),
also in Hastie, Tibshirani and Friedman's *Elements of Statistical Learning* (section 7.10), takes the simplest
candidate that cannot be told apart from the best: here the earliest checkpoint whose mean is within one standard
error (the spread over folds / sqrt(K)) of the best mean. Fewer steps means less drift from the base model (what
the other prompts keep) and less compute, at a cost the folds cannot measure.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    from sdtune.training.config import TrainConfig

REPORT = Path("cv") / "report.json"
RULE = "one-standard-error"
# settings that may differ between the cross-validation and the `steps auto` run without a warning
FREE_FOR_AUTO = {"steps", "cv_folds", "cv_fold", "out", "resume", "val_split", "val_dir", "save_every",
                 "keep_checkpoints", "keep_states", "progress", "tensorboard", "device", "sample_every",
                 "sample_prompts", "sample_seeds", "sample_negative", "sample_steps", "sample_cfg", "sample_sampler",
                 "early_stop", "judge", "judge_term", "judge_seeds", "judge_any_model", "select_by", "latent_cache",
                 "compile", "channels_last", "output_name"}


def fold_of(items: Sequence[Any], k: int, seed: int) -> list[int]:
    """The fold (0..k-1) of each dataset item: a partition, seeded and independent of the items' order.

    Items with the same content (sha256) are one image and share a fold, so a duplicate never sits on both sides.
    The distinct images, sorted by their first path, are shuffled with `Random(f"{seed}:cv-folds")` and dealt round
    robin, so the fold sizes differ by at most one."""
    if k < 2:
        raise SdtuneError(f"cv_folds {k}: use 2 or more")
    groups: dict[str, str] = {}
    for it in items:
        groups[it.sha256] = min(groups.get(it.sha256, it.rel), it.rel)
    if k > len(groups):
        raise SdtuneError(f"cv_folds {k} is more than the {len(groups)} distinct image(s) in the data; use 2.."
                          f"{len(groups)} folds" if len(groups) >= 2 else
                          f"cv_folds needs at least 2 distinct images; the data has {len(groups)}")
    order = sorted(groups, key=lambda h: groups[h])
    random.Random(f"{seed}:cv-folds").shuffle(order)
    fold = {h: i % k for i, h in enumerate(order)}
    return [fold[it.sha256] for it in items]


# ---------------------------------------------------------------------------------------------- statistics

def aggregate(per_fold: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Rows {step, n_folds, <metric>_mean, <metric>_std, <metric>_se} for every step that all folds evaluated, from
    each fold's checkpoint rows (numeric metrics only; std over folds with K-1 in the denominator)."""
    by_step: list[dict[int, Mapping[str, Any]]] = [{int(r["step"]): r for r in rows} for rows in per_fold]
    if not by_step:
        return []
    steps = sorted(set.intersection(*(set(d) for d in by_step)))
    out = []
    for step in steps:
        rows = [d[step] for d in by_step]
        names = [n for n, v in rows[0].items() if _number(v) and n not in ("step", "epoch")]
        row: dict[str, Any] = {"step": step, "n_folds": len(rows)}
        for name in names:
            values = [float(r[name]) for r in rows if _number(r.get(name))]
            if len(values) != len(rows):
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std
            row[f"{name}_se"] = std / math.sqrt(len(values))
        out.append(row)
    return out


def recommend(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The one-standard-error rule over aggregated rows (step 0, the untrained baseline, is never recommended):
    the best mean, the threshold best mean ± its standard error, and the earliest step within it."""
    cands = [r for r in rows if r["step"] > 0 and _number(r.get(f"{metric}_mean"))]
    if not cands:
        return None
    sign = 1.0 if mode == "min" else -1.0
    best = min(cands, key=lambda r: (sign * r[f"{metric}_mean"], r["step"]))
    threshold = best[f"{metric}_mean"] + sign * best[f"{metric}_se"]
    chosen = next(r for r in cands if sign * r[f"{metric}_mean"] <= sign * threshold)
    return {"step": chosen["step"], "best_step": best["step"], "metric": metric, "mode": mode,
            "best_mean": best[f"{metric}_mean"], "best_se": best[f"{metric}_se"], "threshold": threshold,
            "rule": RULE}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- the table

def format_report(report: Mapping[str, Any]) -> str:
    """The printed table: step | val_loss mean ± std | (the selection metric and judge_score, when there) | mark."""
    rows = report.get("steps", [])
    metric = report.get("metric", "val_loss")
    names = ["val_loss"] + [n for n in (metric, "judge_score") if n != "val_loss"]
    names = [n for i, n in enumerate(names) if n not in names[:i] and any(f"{n}_mean" in r for r in rows)]
    rec = report.get("recommendation") or {}
    head = f"{'step':>7} | " + " | ".join(f"{n + ' mean ± std':>26}" for n in names)
    lines = [f"cross-validation: {report.get('folds')} folds of {report.get('images')} image(s), "
             f"{report.get('folds_done', report.get('folds'))} done", head, "-" * len(head)]
    for r in rows:
        cells = [f"{r[f'{n}_mean']:>13.6f} ± {r[f'{n}_std']:<10.6f}" if f"{n}_mean" in r else f"{'':>26}"
                 for n in names]
        mark = "  <- recommended" if r["step"] == rec.get("step") else \
            ("  (best mean)" if r["step"] == rec.get("best_step") else "")
        lines.append(f"{r['step']:>7} | " + " | ".join(cells) + mark)
    if rec:
        better = "lowest" if rec["mode"] == "min" else "highest"
        lines.append(f"recommended step: {rec['step']} (the earliest checkpoint within one standard error of the "
                     f"{better} mean {metric} {rec['best_mean']:.6f} ± {rec['best_se']:.6f} at step "
                     f"{rec['best_step']}); train on all images with --steps auto")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- steps auto

def read_report(out: str | Path) -> dict[str, Any]:
    path = Path(out).expanduser() / REPORT
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdtuneError(f"steps auto needs a cross-validation in {path.parent}: run with --cv-folds K (and "
                          "--steps N) into the same --out first") from None
    except (OSError, ValueError) as exc:
        raise SdtuneError(f"cross-validation report {path} is unreadable ({exc}); run --cv-folds K again") from None
    if not isinstance(doc, dict):
        raise SdtuneError(f"cross-validation report {path} is not a report; run --cv-folds K again")
    return doc


def resolve_auto_steps(config: TrainConfig, echo: Callable[[str], None] | None = None) -> TrainConfig:
    """`steps auto` -> the recommended step of OUT/cv/report.json (complete, same method); settings that differ
    from the cross-validation's (other than `FREE_FOR_AUTO`) are named in a warning. Other configs pass through."""
    if config.steps != "auto":
        return config
    doc = read_report(config.out_dir)
    path = config.out_dir / REPORT
    if doc.get("method") != config.method:
        raise SdtuneError(f"{path} cross-validated {doc.get('method')!r}, not {config.method!r}; use that method "
                          "or another --out")
    if not doc.get("complete"):
        raise SdtuneError(f"the cross-validation in {path.parent} is not finished ({doc.get('folds_done')} of "
                          f"{doc.get('folds')} folds); rerun the same --cv-folds command to finish it")
    step = (doc.get("recommendation") or {}).get("step")
    if not isinstance(step, int) or step < 1:
        raise SdtuneError(f"{path} recommends no step (no checkpoint had the metric); run --cv-folds K again")
    changed = _changed(doc.get("config") or {}, config.to_dict())
    if echo is not None:
        echo(f"steps auto: {step} (cross-validated over {doc.get('folds')} folds in {path}: the earliest checkpoint "
             f"within one standard error of the best mean {doc.get('metric')})")
        if changed:
            echo(f"warning: settings differ from the cross-validation ({', '.join(changed)}); its step may not fit "
                 "this run")
    return config.replace(steps=step)


def _changed(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    out = []
    for sec, values in now.items():
        old = saved.get(sec)
        if isinstance(values, dict) and isinstance(old, dict):
            out += [k for k, v in values.items() if k not in FREE_FOR_AUTO and k in old and old[k] != v]
        elif not isinstance(values, dict) and old != values:
            out.append(sec)
    return out
