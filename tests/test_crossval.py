"""Cross-validated step count (issue 21, part 3): `cv_folds` K fold runs and `steps auto`, on tiny random models.

Checked: the folds partition the images and each fold run validates on exactly its fold; the report's means and
standard deviations are the per-fold ledgers'; the recommended step follows the one-standard-error rule; steps auto
trains to it; every image is encoded by the VAE once for all folds; a rerun skips finished folds; the CLI, the
config schema (TOML, UI) and the UI's training API reach it."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest

from sdtune.errors import SdtuneError
from sdtune.training import TrainConfig, train
from sdtune.training.crossval import cross_validate
from sdtune.training.folds import aggregate, fold_of, recommend
from sdtune.training.testing import tiny_loaded
from sdtune.toy.testing import write_toy_dataset

N_IMAGES = 6


@pytest.fixture(scope="module")
def pristine():
    return tiny_loaded("sd1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("cvdata"), N_IMAGES, size=32)


def config(tmp_path, data, **kw):
    base = dict(method="lora", data=str(data), out=str(tmp_path / "out"), steps=4, lr=1e-3, resolution=32,
                save_every=2, progress=False, tensorboard=False, cv_folds=3, val_timesteps=2)
    base.update(kw)
    return TrainConfig(**base)


def quiet(**kw):
    return dict(echo=lambda s: None, **kw)


# ------------------------------------------------------------------------------------------------ the folds

class Item:
    def __init__(self, rel, sha):
        self.rel, self.sha256 = rel, sha


def test_folds_are_a_seeded_balanced_partition_independent_of_order():
    items = [Item(f"{i:02d}.png", f"h{i}") for i in range(11)]
    folds = fold_of(items, 4, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3]
    sizes = [folds.count(k) for k in range(4)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 11
    assert fold_of(list(reversed(items)), 4, seed=0) == list(reversed(folds))  # by content, not position
    assert fold_of(items, 4, seed=1) != folds                                   # seeded
    dup = items + [Item("copy-of-03.png", "h3")]                               # same image: same fold
    f = fold_of(dup, 4, seed=0)
    assert f[-1] == f[3]
    with pytest.raises(SdtuneError, match="more than the 11 distinct"):
        fold_of(items, 12, seed=0)


def test_one_standard_error_rule():
    # per-fold val loss at steps 10..40: the minimum mean is at 30, step 20 is within one SE of it, 10 is not
    folds = [[{"step": 10, "val_loss": 1.0}, {"step": 20, "val_loss": 0.48}, {"step": 30, "val_loss": 0.50},
              {"step": 40, "val_loss": 0.7}],
             [{"step": 10, "val_loss": 1.2}, {"step": 20, "val_loss": 0.50}, {"step": 30, "val_loss": 0.40},
              {"step": 40, "val_loss": 0.8}]]
    rows = aggregate(folds)
    r30 = next(r for r in rows if r["step"] == 30)
    assert r30["val_loss_mean"] == pytest.approx(0.45)
    assert r30["val_loss_se"] == pytest.approx(statistics.stdev([0.5, 0.4]) / math.sqrt(2))
    rec = recommend(rows, "val_loss", "min")
    assert rec["best_step"] == 30 and rec["step"] == 20  # 0.49 <= 0.45 + 0.05; step 10 (1.1) is not
    assert next(r for r in rows if r["step"] == 20)["val_loss_mean"] <= rec["threshold"]
    # a metric to maximise: the earliest step within one SE below the highest mean
    up = aggregate([[{"step": 1, "s": 0.2}, {"step": 2, "s": 0.8}, {"step": 3, "s": 0.9}],
                    [{"step": 1, "s": 0.3}, {"step": 2, "s": 0.7}, {"step": 3, "s": 0.7}]])
    assert recommend(up, "s", "max")["step"] == 2


# ------------------------------------------------------------------------------------------------ the runs

def count_vae_images(monkeypatch):
    """Images the VAE encodes (every training/validation encoding goes through `encode_latents`)."""
    import sdtune.training.latents as latents

    real = latents.encode_latents
    seen = []

    def counting(vae, images, **kw):
        seen.append(len(images) * (2 if kw.get("flip_variants") else 1))
        return real(vae, images, **kw)

    monkeypatch.setattr(latents, "encode_latents", counting)
    return seen


def test_cross_validation_end_to_end(tmp_path, data, pristine, monkeypatch):
    seen = count_vae_images(monkeypatch)
    cfg = config(tmp_path, data)
    cv = cross_validate(cfg, model=pristine, **quiet())
    assert cv.stopped == "finished" and len(cv.folds) == 3
    # every image encoded once for all three folds (each is a training image twice and a validation image once)
    assert sum(seen) == N_IMAGES and cv.latents_encoded == N_IMAGES
    report = json.loads((tmp_path / "out" / "cv" / "report.json").read_text())
    assert report["complete"] and report["folds"] == 3 and report["images"] == N_IMAGES
    # the folds partition the images, and each fold run validated on exactly its fold
    held = [set(f["held_out"]) for f in report["per_fold"]]
    assert sum(len(h) for h in held) == N_IMAGES and set().union(*held) == {f"{i:03d}.png" for i in range(N_IMAGES)}
    for k, result in enumerate(cv.folds):
        log = [json.loads(x) for x in (tmp_path / "out" / "cv" / f"fold-{k}" / "log.jsonl").read_text().splitlines()]
        start = next(r for r in log if r["event"] == "start")
        assert start["val_images"] == len(held[k]) and start["images"] == N_IMAGES - len(held[k])
    # the report's statistics are the per-fold ledgers'
    ledgers = [json.loads((tmp_path / "out" / "cv" / f"fold-{k}" / "summary.json").read_text())["checkpoints"]
               for k in range(3)]
    for row in report["steps"]:
        if row["step"] == 0:
            continue
        values = [next(r["val_loss"] for r in ledger if r["step"] == row["step"]) for ledger in ledgers]
        assert row["val_loss_mean"] == pytest.approx(statistics.fmean(values))
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(values))
    assert [r["step"] for r in report["steps"]] == [0, 2, 4]  # the untrained baseline, then every checkpoint
    rec = report["recommendation"]
    assert rec == recommend(report["steps"], "val_loss", "min") and rec["step"] in (2, 4)
    assert "recommended" in cv.table and f"{rec['step']:>7} |" in cv.table

    # a rerun skips the finished folds: no training, no encoding
    seen.clear()
    again = cross_validate(cfg, model=pristine, **quiet())
    assert again.folds == [None, None, None] and sum(seen) == 0
    assert again.report["recommendation"] == rec

    # steps auto: all images, to the recommended step
    final = train(cfg.replace(cv_folds=0, steps="auto"), model=copy.deepcopy(pristine), **quiet())
    assert final.step == rec["step"] and final.final is not None
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["optim"]["steps"] == rec["step"]
    log = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert next(r for r in log if r["event"] == "start")["images"] == N_IMAGES


def test_rerun_resumes_an_interrupted_fold_and_refuses_changed_settings(tmp_path, data, pristine):
    cfg = config(tmp_path, data, cv_folds=2)

    def stop_in_fold_1(trainer, step, loss):
        if trainer.config.cv_fold == 1 and step == 1:
            trainer.request_stop()

    first = cross_validate(cfg, model=pristine, on_step=stop_in_fold_1, **quiet())
    assert first.stopped == "interrupted" and not first.report["complete"]
    with pytest.raises(SdtuneError, match="not finished"):
        train(cfg.replace(cv_folds=0, steps="auto"), model=copy.deepcopy(pristine), **quiet())
    second = cross_validate(cfg, model=pristine, **quiet())
    assert second.folds[0] is None and second.folds[1] is not None and second.report["complete"]
    assert second.folds[1].losses and len(second.folds[1].losses) == 3  # continued from step 1
    with pytest.raises(SdtuneError, match="other settings"):
        cross_validate(cfg.replace(lr=5e-4), model=pristine, **quiet())


def test_bad_combinations_are_one_line_errors(tmp_path, data):
    def refused(match, **kw):
        with pytest.raises(SdtuneError, match=match):
            config(tmp_path, data, **kw).check_values()

    refused("use 2 or more", cv_folds=1)
    refused("use 2 or more", cv_folds=-3)
    refused("drop --val-split", val_split=0.2)
    refused("drop --early-stop", early_stop="2")
    refused("--save-every below", save_every=0)
    refused("--save-every below", save_every=4)
    refused("steps auto comes after", steps="auto")
    refused("drop --val-split", cv_folds=0, steps="auto", val_split=0.2)
    with pytest.raises(SdtuneError, match="more than the 6 image"):
        cross_validate(config(tmp_path, data, cv_folds=7), **quiet())
    with pytest.raises(SdtuneError, match="run with --cv-folds K"):
        train(config(tmp_path, data, cv_folds=0, steps="auto"), **quiet())
    with pytest.raises(SdtuneError, match="cross_validate"):
        train(config(tmp_path, data), **quiet())


def test_the_settings_reach_toml_cli_and_the_ui_schema(tmp_path, data):
    from sdtune.server.sdtune_api import config_schema

    cfg = TrainConfig.from_dict({"method": "ti", "optim": {"steps": "auto"}, "eval": {"cv_folds": 4}})
    assert cfg.steps == "auto" and cfg.cv_folds == 4
    back = TrainConfig.from_dict(__import__("tomllib").loads(cfg.to_toml()))
    assert back.steps == "auto" and back.cv_folds == 4
    with pytest.raises(SdtuneError, match="whole number or auto"):
        TrainConfig.from_dict({"steps": "many"})
    fields = {f["name"]: f for f in config_schema()["fields"]}
    assert fields["cv_folds"]["kind"] == "int" and fields["steps"]["kind"] == "steps"
    assert "cv_fold" not in fields  # internal: set by the cross-validation for its fold runs


def test_cli_cross_validates_then_trains_with_steps_auto(tmp_path, data, capsys, monkeypatch):
    import sdtune.models
    from sdtune.cli.testing import run_cli

    pristine = tiny_loaded("sd1")
    monkeypatch.setattr(sdtune.models, "load_model", lambda *a, **k: copy.deepcopy(pristine))
    out = tmp_path / "cli"
    common = ["train", "hypernetwork", "--data", str(data), "--out", str(out), "--resolution", "32", "--lr", "1e-3",
              "--save-every", "2", "--no-progress", "--no-tensorboard", "--val-timesteps", "2"]
    code, stdout, err = run_cli(common + ["--steps", "4", "--cv-folds", "2"], capsys)
    assert code == 0, err
    report = json.loads((out / "cv" / "report.json").read_text())
    step = report["recommendation"]["step"]
    assert "recommended step" in stdout and "--steps auto" in stdout
    code, stdout, err = run_cli(common + ["--steps", "auto"], capsys)
    assert code == 0, err
    assert f"steps auto: {step}" in err
    assert json.loads((out / "summary.json").read_text())["step"] == step


def test_ui_training_api_cross_validates(tmp_path, data, pristine, monkeypatch):
    import sdtune.models
    from sdtune.server.folders import ModelFolders
    from sdtune.server.runs import RunRegistry, read_run

    monkeypatch.setattr(sdtune.models, "load_model", lambda *a, **k: copy.deepcopy(pristine))

    class Jobs:
        def submit(self, job):
            job.result = job.run(job)
            return job

    registry = RunRegistry(ModelFolders(runs=tmp_path), Jobs())
    cfg = config(tmp_path, data, out=str(tmp_path / "ui-run"), cv_folds=2, model="tiny")
    job = registry.start(cfg)
    assert job.result.report["complete"] and job.progress.total == 2 * 4 and job.progress.step == 2 * 4
    assert read_run(tmp_path / "ui-run")["cv"]["recommendation"]["step"] in (2, 4)


def test_evaluator_metrics_are_averaged_and_can_choose_the_step(tmp_path, data, pristine):
    # an evaluator metric (as the toy judge's judge_score) that peaks at step 2 in every fold
    def evaluator(ctx):
        return {"score": 1.0 - abs(ctx.step - 2) * 0.25}

    cfg = config(tmp_path, data, cv_folds=2, select_by="score:max")
    cv = cross_validate(cfg, model=pristine, evaluator=evaluator, **quiet())
    rows = {r["step"]: r for r in cv.report["steps"]}
    assert rows[2]["score_mean"] == pytest.approx(1.0) and rows[4]["score_mean"] == pytest.approx(0.5)
    assert cv.report["metric"] == "score" and cv.recommended_step == 2
    assert "score mean" in cv.table


def test_steps_auto_reads_the_report_and_names_changed_settings(tmp_path, data):
    from sdtune.training.folds import resolve_auto_steps

    cv_cfg = config(tmp_path, data, cv_folds=3, steps=40, save_every=10)
    (tmp_path / "out" / "cv").mkdir(parents=True)
    report = {"method": "lora", "folds": 3, "folds_done": 3, "complete": True, "metric": "val_loss",
              "recommendation": {"step": 20}, "config": cv_cfg.to_dict()}
    (tmp_path / "out" / "cv" / "report.json").write_text(json.dumps(report))
    said = []
    auto = resolve_auto_steps(cv_cfg.replace(cv_folds=0, steps="auto"), said.append)
    assert auto.steps == 20 and auto.total_steps == 20 and len(said) == 1
    said.clear()
    resolve_auto_steps(cv_cfg.replace(cv_folds=0, steps="auto", lr=5e-4), said.append)
    assert "settings differ" in said[1] and "lr" in said[1]
    with pytest.raises(SdtuneError, match="cross-validated 'lora', not 'ti'"):
        resolve_auto_steps(TrainConfig(method="ti", data=str(data), out=str(tmp_path / "out"), steps="auto"))
    (tmp_path / "out" / "cv" / "report.json").write_text(json.dumps({**report, "complete": False}))
    with pytest.raises(SdtuneError, match="not finished"):
        resolve_auto_steps(cv_cfg.replace(cv_folds=0, steps="auto"))


@pytest.mark.parametrize("method", ["ti", "dreambooth"])
def test_every_method_cross_validates(tmp_path, data, pristine, method, monkeypatch):
    """TI, and DreamBooth with prior preservation: its class images are generated once for all folds."""
    from sdtune.training.methods.dreambooth import DreamBoothOptions
    from sdtune.training.methods.textual_inversion import TIOptions

    import sdtune.training.prior as prior

    generated = []
    real = prior.generated_class_images

    def counting(ctx, class_prompt, count):
        before = len(list((ctx.out / "class_images").rglob("*.png")))
        images = real(ctx, class_prompt, count)
        generated.append(len(list((ctx.out / "class_images").rglob("*.png"))) - before)
        return images

    monkeypatch.setattr(prior, "generated_class_images", counting)
    options = TIOptions(token="<star>", init="shape", vectors=1) if method == "ti" else \
        DreamBoothOptions(prompt="a photo of sks shape", class_prompt="a photo of a shape", num_class_images=2)
    cfg = config(tmp_path, data, method=method, options=options, cv_folds=2, lr=1e-4 if method == "dreambooth"
                 else 1e-3, sample_steps=2)
    cv = cross_validate(cfg, model=pristine, **quiet())
    assert cv.report["complete"] and cv.recommended_step in (2, 4)
    if method == "dreambooth":
        assert generated == [2, 0]  # the first fold generates, the second reuses OUT/cv/class_images
        assert (tmp_path / "out" / "cv" / "class_images").is_dir()
