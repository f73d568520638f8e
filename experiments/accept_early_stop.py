"""Acceptance of validation and early stopping on the toy world (issue 7): a deliberately too long Textual
Inversion (`<star>` from 5 rendered red stars) and LoRA (the shape "heart" from 10 red hearts) run with the judge on.

    OMP_NUM_THREADS=1 nice -n 10 python experiments/accept_early_stop.py --only ti   --out runs/accept_es4
    OMP_NUM_THREADS=1 nice -n 10 python experiments/accept_early_stop.py --only lora --out runs/accept_es4
    # the LoRA on varied data (every colour/background pair seen in training):
    ... --only lora --out runs/accept_es_wide --no-lora-narrow --lora-images 20 --lora-lr 2e-3 --lora-steps 2000
    python experiments/accept_early_stop.py --out runs/accept_es --report          # tables from the saved results

Per method, two real runs with the same seed and settings:
  curve  the whole too-long run, no early stopping, every checkpoint kept and judged (the last one included);
  early  the same run with `--early-stop P --select-by judge_score:max`: where it stops and what it chooses.
Training is deterministic and evaluation does not touch the training RNG, so the early run's rows must equal
the curve's first rows (checked), and "chosen vs last" compares the early run's choice with the curve's last.

Every checkpoint (every --every steps): train loss (mean since the previous checkpoint), fixed-noise validation
loss on separately rendered held-out images, and the judge (`sdtune.toy.concept_eval`): fidelity (context-free
prompts draw the shape), context (a new colour and background both as asked), context_shape (the shape drawn in
those images), context_both (shape, colour and background all as asked: editability), judge_score =
(fidelity + context_both) / 2. Writes OUT/<method>/result.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# the captions of the measured LoRA runs (experiments/accept_lora.py's at the time; kept here so the runs repeat)
HEART_TEMPLATES = ("a sks shape", "a {colour} sks shape", "a sks shape on a {background} background",
                   "a {colour} sks shape on a {background} background")
METRICS = ("train_loss", "val_loss", "fidelity", "context", "context_shape", "context_both", "judge_score")


def ti_config(args: argparse.Namespace, work: Path) -> Any:
    from sdtune.toy import ti
    from sdtune.training import TrainConfig
    from sdtune.training.methods.textual_inversion import TIOptions

    narrow = dict(colours=("red",), backgrounds=("white", "gray"))  # narrow data, as in the documented runs
    data = ti.write_concept_dataset(work / "data", shape="star", n=5, seed=args.seed, **narrow)
    val = ti.write_concept_dataset(work / "val", shape="star", n=3, seed=args.seed + 100, **narrow)
    templates = ti.write_templates(work / "templates.txt")
    return TrainConfig(method="ti", model=args.model, data=str(data), val_dir=str(val), steps=args.ti_steps,
                       lr=args.ti_lr, batch_size=2, flip=0.5, latents="mean", seed=args.seed,
                       options=TIOptions(token="<star>", init="shape", vectors=args.ti_vectors,
                                         templates=str(templates)),
                       judge="star", **common(args))


def lora_config(args: argparse.Namespace, work: Path) -> Any:
    from sdtune.training import TrainConfig
    from sdtune.training.methods.lora import LoraOptions

    # narrow: the heart only in red on white/gray, as TI's stars, so every judged context is new; else random
    # colours and backgrounds (the LoRA acceptance's data as of this script)
    kw = dict(colours=("red",), backgrounds=("white", "gray")) if args.lora_narrow else {}
    data = hearts(work / "data", args.lora_images, args.seed, **kw)
    val = hearts(work / "val", 4, args.seed + 100, **kw)
    return TrainConfig(method="lora", model=args.model, data=str(data), val_dir=str(val), steps=args.lora_steps,
                       lr=args.lora_lr, batch_size=4, latents="sample", seed=args.seed,
                       options=LoraOptions(rank=8, alpha=8, targets=["attn", "ff", "conv"]),
                       judge="heart", judge_term="sks shape", **common(args))


def hearts(folder: Path, n: int, seed: int, **scene_kw: Any) -> Path:
    """n rendered hearts with "sks shape" captions (one of HEART_TEMPLATES each)."""
    import random

    from sdtune.toy import world
    from sdtune.toy.evaluate import write_dataset

    rng = random.Random(seed)
    scenes = [world.random_scene(rng, shapes=("heart",), styles=("solid",), **scene_kw) for _ in range(n)]
    write_dataset(folder, scenes, [rng.choice(HEART_TEMPLATES).format(colour=s.colour, background=s.background)
                                   for s in scenes])
    return folder


def common(args: argparse.Namespace) -> dict[str, Any]:
    return dict(save_every=args.every, judge_seeds=args.seeds, sample_steps=args.gen_steps,
                select_by="judge_score:max", progress=False, tensorboard=False)


def run_one(method: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from sdtune.toy.concept_eval import evaluator_for
    from sdtune.training import train

    work = out / method
    wanted = args.runs.split(",")
    res: dict[str, Any] = {}
    if "curve" in wanted:
        if work.exists():
            shutil.rmtree(work)
    else:  # only the early run, next to a saved curve made with the same settings
        res = json.loads((work / "result.json").read_text())
        shutil.rmtree(work / "early", ignore_errors=True)
        for k in ("early", "analysis"):
            res.pop(k, None)
    cfg = (ti_config if method == "ti" else lora_config)(args, work)
    if res and res["config"] != cfg.to_dict():
        raise SystemExit(f"{work}: the saved curve was made with other settings; rerun with --runs curve,early")
    res.update({"method": method, "config": cfg.to_dict(), "patience": args.patience})
    runs = {"curve": cfg.replace(out=str(work / "curve"), keep_checkpoints="all"),
            "early": cfg.replace(out=str(work / "early"), early_stop=str(args.patience))}
    for name, c in runs.items():
        if name not in wanted:
            continue
        t0, p0 = time.perf_counter(), time.process_time()
        r = train(c, echo=lambda s: print(f"[{method} {name}] {s}", flush=True), evaluator=evaluator_for(c))
        res[name] = {"rows": [{k: row.get(k) for k in ("step", *METRICS)} for row in r.rows], "stopped": r.stopped,
                     "step": r.step, "best_step": r.best_step, "final": str(r.final),
                     "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - p0, 1)}
        print(f"[{method}] {name}: {r.stopped} at step {r.step}, best {r.best_step}, "
              f"{res[name]['wall_s']} s wall", flush=True)
        (work / "result.json").write_text(json.dumps(res, indent=1))
    res["analysis"] = analyse(res)
    (work / "result.json").write_text(json.dumps(res, indent=1))
    return res


def simulate(rows: list[dict[str, Any]], patience: int, metric: str = "judge_score", mode: str = "max"
             ) -> tuple[int | None, int]:
    """(chosen step, stop step) that the loop's `Selection` gives on these rows: the early run without running it
    (exact, since the early run's rows equal the curve's prefix; used when only the curve was run)."""
    from sdtune.training.validation import Selection

    sel = Selection(metric, mode, patience)
    for r in rows:
        sel.update(r["step"], r[metric])
        if sel.should_stop:
            return sel.best_step, r["step"]
    return sel.best_step, rows[-1]["step"]


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    if "early" not in res:  # curve only: early stopping computed with the loop's own Selection
        best, stop = simulate(res["curve"]["rows"], res["patience"])
        n = next(i for i, r in enumerate(res["curve"]["rows"]) if r["step"] == stop) + 1
        res["early"] = {"rows": res["curve"]["rows"][:n], "best_step": best, "step": stop, "wall_s": None,
                        "stopped": "early_stop (simulated)" if stop < res["curve"]["rows"][-1]["step"] else "finished",
                        "simulated": True}
    curve, early = res["curve"]["rows"], res["early"]["rows"]
    every = curve[0]["step"]
    same = all(all(_close(a.get(k), b.get(k)) for k in ("step", *METRICS)) for a, b in zip(early, curve))
    chosen = next(r for r in curve if r["step"] == res["early"]["best_step"])
    last = curve[-1]
    by = lambda k, f: f(curve, key=lambda r: r[k])["step"]  # noqa: E731 - first step at the optimum
    a = {"early_rows_equal_curve_prefix": same, "chosen_step": chosen["step"], "stopped_at": res["early"]["step"],
         "stopped": res["early"]["stopped"], "last_step": last["step"],
         "judge_optimum_step": by("judge_score", max), "val_loss_optimum_step": by("val_loss", min),
         "stop_after_best_steps": res["early"]["step"] - chosen["step"], "patience_steps": res["patience"] * every,
         "chosen": chosen, "last": last,
         "context_gain": chosen["context_both"] - last["context_both"], "fidelity_change": chosen["fidelity"] - last["fidelity"]}
    a["context_better"] = a["context_gain"] > 0
    a["fidelity_within_5pt"] = a["fidelity_change"] >= -0.05
    # the run's whole-curve judge optimum was chosen, and the run stopped at most `patience` checkpoints after it
    opt = a["judge_optimum_step"]
    a["score_regret"] = max(r["judge_score"] for r in curve) - chosen["judge_score"]
    a["stops_within_patience"] = res["early"]["stopped"].startswith("early_stop") and chosen["step"] == opt and \
        0 <= res["early"]["step"] - opt <= a["patience_steps"]
    a["context_degrades"] = max(r["context_both"] for r in curve) - last["context_both"]
    a["patience_sweep"] = []  # what other patiences would have done on the same curve (exact, see `simulate`)
    for pat in range(1, 7):
        b, st = simulate(curve, pat)
        row = next(r for r in curve if r["step"] == b)
        a["patience_sweep"].append({"patience": pat, "stop": st, "chosen": b, "fidelity": row["fidelity"],
                                    "context_both": row["context_both"]})
    a["simulated_matches_early"] = simulate(early, res["patience"]) == (res["early"]["best_step"], res["early"]["step"])
    return a


def _close(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= 1e-6 * max(1.0, abs(x))
    return x == y


def table(res: dict[str, Any]) -> list[str]:
    a = res["analysis"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["| step | train loss | val loss | fidelity % | context % | context shape % | context both % | "
             "judge score % | |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in res["curve"]["rows"]:
        marks = [m for m, s in (("chosen", a["chosen_step"]), ("early stop", a["stopped_at"]),
                                ("last", a["last_step"])) if r["step"] == s]
        if r["step"] == a["val_loss_optimum_step"]:
            marks.append("min val loss")
        tl = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        lines.append(f"| {r['step']} | {tl} | {r['val_loss']:.5f} | {pct(r['fidelity'])} | {pct(r['context'])} | "
                     f"{pct(r['context_shape'])} | {pct(r['context_both'])} | {pct(r['judge_score'])} | {', '.join(marks)} |")
    return lines


def report(out: Path) -> str:
    parts = ["# Early stopping on the toy world (issue 7 acceptance)", "",
             "chosen = the early-stopped run's best checkpoint; last = the too-long run's final checkpoint.", ""]
    for method in ("ti", "lora"):
        p = out / method / "result.json"
        if not p.exists():
            continue
        res = json.loads(p.read_text())
        if "analysis" not in res:
            parts += [f"## {method}: incomplete run", ""]
            continue
        a, cfg = res["analysis"], res["config"]
        c, la = a["chosen"], a["last"]
        n_img = len(list(Path(cfg["data"]["data"]).glob("*.png")))
        what = {"ti": f"Textual Inversion <star>, {n_img} red stars",
                "lora": f"LoRA heart (sks shape), {n_img} images"}[method]
        ok = lambda b: "yes" if b else "NO"  # noqa: E731
        parts += [f"## {what}: {cfg['optim']['steps']} steps at lr {cfg['optim']['lr']}, judged every "
                  f"{cfg['output']['save_every']} steps ({cfg['eval']['judge_seeds']} seeds per prompt)", "",
                  *table(res), "",
                  f"* early run (`--early-stop {res['patience']} --select-by judge_score:max`): {a['stopped']} at step "
                  f"{a['stopped_at']}, chose step {a['chosen_step']}; "
                  + (f"{res['early']['wall_s']} s wall" if res["early"].get("wall_s") else
                     "not run: computed from the curve with the loop's Selection")
                  + f" (the full curve run: {res['curve']['wall_s']} s wall, {res['curve']['cpu_s']} s CPU)",
                  f"* judge-score optimum of the whole curve: step {a['judge_optimum_step']} (the chosen one scores "
                  f"{100 * a['score_regret']:.1f} pt less); val-loss optimum: step {a['val_loss_optimum_step']}",
                  f"* chosen vs last (step {a['chosen_step']} vs {a['last_step']}): fidelity {100 * c['fidelity']:.1f}% vs "
                  f"{100 * la['fidelity']:.1f}% ({100 * a['fidelity_change']:+.1f} pt), context both "
                  f"{100 * c['context_both']:.1f}% vs {100 * la['context_both']:.1f}% ({100 * a['context_gain']:+.1f} "
                  f"pt); context {100 * c['context']:.1f}% vs {100 * la['context']:.1f}%, "
                  f"context shape {100 * c['context_shape']:.1f}% vs {100 * la['context_shape']:.1f}%",
                  f"* chose the whole-curve optimum and stopped within patience ({a['patience_steps']} steps) "
                  "after it: "
                  f"{ok(a['stops_within_patience'])}; chosen context both better than last: {ok(a['context_better'])}; "
                  f"fidelity within 5 pt: {ok(a['fidelity_within_5pt'])}; early rows equal the curve's: "
                  f"{ok(a['early_rows_equal_curve_prefix'])}",
                  "* other patiences on the same curve (stop -> chosen: fidelity / context both): " + "; ".join(
                      f"{q['patience']}: {q['stop']} -> {q['chosen']}: {100 * q['fidelity']:.0f}% / "
                      f"{100 * q['context_both']:.0f}%" for q in a.get("patience_sweep", [])), ""]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/accept_es"))
    ap.add_argument("--only", default="ti,lora")
    ap.add_argument("--runs", default="curve,early", help="curve,early or early (next to a saved curve)")
    ap.add_argument("--report", action="store_true", help="only print/write the report from saved results")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=100, help="save + judge every N steps")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=8, help="judge images per prompt")
    ap.add_argument("--gen-steps", type=int, default=20)
    ap.add_argument("--ti-steps", type=int, default=2000)
    ap.add_argument("--ti-lr", default="5e-3")
    ap.add_argument("--ti-vectors", type=int, default=2)
    ap.add_argument("--lora-steps", type=int, default=1500)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--lora-images", type=int, default=10)
    ap.add_argument("--lora-narrow", action=argparse.BooleanOptionalAction, default=True,
                    help="red hearts on white/gray only, like the TI data (--no-lora-narrow: random colours and "
                    "backgrounds)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for method in args.only.split(","):
            run_one(method, args, args.out)
    for method in ("ti", "lora"):  # results whose early run was not made or not analysed
        p = args.out / method / "result.json"
        if p.exists():
            res = json.loads(p.read_text())
            if "curve" in res and (args.report or "analysis" not in res):
                if "early" in res and not res["early"].get("rows"):
                    del res["early"]
                res["analysis"] = analyse(res)
                p.write_text(json.dumps(res, indent=1))
    text = report(args.out)
    print(text)
    (args.out / "report.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
