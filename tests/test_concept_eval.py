"""The toy-world concept judge (`toy.concept_eval`): its metrics on known images, the `judge` config option and
its validation, the CLI flags, and a tiny run whose checkpoints are judged, selected and summarised."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.toy import world
from sdtune.toy.concept_eval import ConceptJudge, default_term, evaluator_for, judge_from_config
from sdtune.training import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


def fake_generate(obey_context: bool, shape: str = "star"):
    """Renders `shape` for every prompt; in the asked colour/background when `obey_context`, else red on white."""
    def generate(prompts, seeds):
        out = []
        for p in prompts:
            words = p.split()
            colour = next((w for w in words if w in world.COLOURS), "red") if obey_context else "red"
            bg = next((w for w in words if w in world.BACKGROUNDS), "white") if obey_context else "white"
            out += [world.render(world.Scene(shape, colour, bg)) for _ in seeds]
        return out
    return generate


def test_metrics_separate_fidelity_from_context():
    j = ConceptJudge(shape="star", term="<star>", seeds=[0, 1], per_prompt=True)
    good = j.score(fake_generate(True))
    assert good["fidelity"] == good["context"] == good["context_shape"] == good["context_both"] == 1.0
    assert good["judge_score"] == 1.0
    assert good["fidelity[a photo of a <star>]"] == 1.0
    # an overfit concept: always the training image, whatever the prompt asks for
    overfit = j.score(fake_generate(False))
    assert overfit["fidelity"] == 1.0 and overfit["context_shape"] == 1.0
    assert overfit["context"] == 0.0  # no context asks for red
    assert overfit["context_both"] == 0.0 and overfit["judge_score"] == 0.5
    wrong = ConceptJudge(shape="heart", term="sks shape", seeds=[0]).score(fake_generate(True, "circle"))
    assert wrong["fidelity"] == 0.0 and wrong["context"] == 1.0 and wrong["context_both"] == 0.0
    assert wrong["judge_score"] == 0.0  # obeying the context without the concept is not editability
    assert j.context_prompts()[0] == ("a blue <star> on a black background", "blue", "black")


def test_ti_judge_prompts_keeps_its_names():
    from sdtune.toy import ti

    m = ti.judge_prompts(fake_generate(True), "<star>", "star", [0], keep=1)
    assert {"shape_fidelity", "context_kept", "context_shape", "images"} <= set(m)
    assert m["fidelity[a red <star> on a white background]"] == 1.0 and len(m["images"]) == 7


def cfg(tmp_path, **kw):
    from sdtune.training.methods.textual_inversion import TIOptions

    base = dict(method="ti", data=str(tmp_path), out=str(tmp_path / "out"), steps=4, save_every=2, lr=5e-3,
                progress=False, tensorboard=False, judge="star",
                options=TIOptions(token="<star>", init="shape", vectors=1))
    base.update(kw)
    return TrainConfig(**base)


def test_config_validation(tmp_path):
    from sdtune.training.methods.lora import LoraOptions

    c = cfg(tmp_path).check_values()
    assert default_term(c) == "<star>" and judge_from_config(c).term == "<star>"
    lora = TrainConfig(method="lora", judge="heart", options=LoraOptions(prompt="a photo of sks shape"))
    assert judge_from_config(lora.check_values()).term == "sks shape"
    assert judge_from_config(lora.replace(judge_term="zzk heart")).term == "zzk heart"
    with pytest.raises(SdtuneError, match="judge-term"):
        judge_from_config(TrainConfig(method="lora", judge="heart").check_values())
    with pytest.raises(SdtuneError, match="not a toy-world shape"):
        judge_from_config(cfg(tmp_path, judge="blob").check_values())
    with pytest.raises(SdtuneError, match="not tiny"):
        cfg(tmp_path, model="models/sd15").check_values()
    cfg(tmp_path, model="models/toy", judge_any_model=True).check_values()
    with pytest.raises(SdtuneError, match="judge_seeds"):
        cfg(tmp_path, judge_seeds=0).check_values()
    with pytest.raises(SdtuneError, match="--judge SHAPE"):
        cfg(tmp_path, judge=None, select_by="judge_score:max").check_values()
    assert TrainConfig.from_dict(cfg(tmp_path).to_dict()).judge == "star"  # round trip through the file layout


def test_the_training_core_needs_the_judge_passed_in(tmp_path):
    """The loop never imports the toy world: a config asking for the judge without the evaluator is refused."""
    from sdtune.toy.testing import write_toy_dataset
    from sdtune.training.testing import tiny_loaded

    data = write_toy_dataset(tmp_path / "data", 2, size=32, shapes=("star",))
    with pytest.raises(SdtuneError, match="evaluator_for"):
        train(cfg(tmp_path, data=str(data), resolution=32), model=copy.deepcopy(tiny_loaded("sd1")),
              echo=lambda s: None)


def test_cli_flags(tmp_path):
    from click.testing import CliRunner

    from sdtune.cli import _register, cli

    _register()
    args = ["train", "ti", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--token", "<star>", "--judge",
            "star", "--judge-seeds", "2", "--select-by", "judge_score:max", "--early-stop", "3", "--dry-run"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    import tomllib

    ev = tomllib.loads(r.output)["eval"]
    assert ev["judge"] == "star" and ev["judge_seeds"] == 2 and ev["select_by"] == "judge_score:max"
    r = CliRunner().invoke(cli, args[:-1] + ["--model", str(tmp_path), "--dry-run"])
    assert r.exit_code != 0 and "not tiny" in str(r.exception)


def test_judged_run_selects_by_judge_score(tmp_path):
    from sdtune.toy.testing import write_toy_dataset
    from sdtune.training.testing import tiny_loaded

    data = write_toy_dataset(tmp_path / "data", 2, size=32, shapes=("star",),
                             caption="a {colour} [name] on a white background")
    seen = []
    c = cfg(tmp_path, data=str(data), resolution=32, judge_seeds=1, sample_steps=2, steps=6,
            select_by="judge_score:max", keep_checkpoints="all")
    r = train(c, model=copy.deepcopy(tiny_loaded("sd1")), echo=lambda s: None,
              evaluator=evaluator_for(c, lambda ctx: seen.append(ctx.step) or {"mine": 1.0}))
    assert seen == [2, 4, 6]  # the given evaluator still runs, next to the judge
    assert [row["step"] for row in r.rows] == [2, 4, 6]
    scores = [row["judge_score"] for row in r.rows]
    for row in r.rows:
        assert row["mine"] == 1.0 and 0 <= row["fidelity"] <= 1 and 0 <= row["context"] <= 1
        assert row["context_both"] <= min(row["context"], row["context_shape"])
        assert row["judge_score"] == pytest.approx((row["fidelity"] + row["context_both"]) / 2)
    assert r.best_step == r.rows[scores.index(max(scores))]["step"]  # the first of the best
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["select_by"] == "judge_score" and summary["best_step"] == r.best_step
    header = next(csv.reader((tmp_path / "out" / "summary.csv").open()))
    assert {"fidelity", "context", "context_shape", "context_both", "judge_score"} <= set(header)


def test_early_stop_on_judge_score(tmp_path):
    """Weights that barely move give the same images, so the same judge_score: a tie is no improvement, and
    patience 1 stops at the second evaluation with the first as the best."""
    from sdtune.toy.testing import write_toy_dataset
    from sdtune.training.testing import tiny_loaded

    data = write_toy_dataset(tmp_path / "data", 2, size=32, shapes=("star",),
                             caption="a {colour} [name] on a white background")
    c = cfg(tmp_path, data=str(data), resolution=32, judge_seeds=1, sample_steps=1, steps=20,
            select_by="judge_score:max", early_stop="1", lr=1e-9)
    r = train(c, model=copy.deepcopy(tiny_loaded("sd1")), echo=lambda s: None, evaluator=evaluator_for(c))
    assert r.stopped == "early_stop" and r.step == 4 and r.best_step == 2
