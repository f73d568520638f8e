"""Training config: TOML files, CLI overrides, validation, LR schedules and the early-stop setting."""

from __future__ import annotations

import json
import math

import pytest

from sdtune.errors import SdtuneError
from sdtune.training.config import TrainConfig
from sdtune.training.config_checks import parse_select_by
from sdtune.training.schedules import LRSchedule, parse_early_stop, parse_lr

RUN_TOML = """
method = "lora"
[model]
model = "tiny"
[data]
data = "{data}"
resolution = 32
[optim]
steps = 50
lr = "0.005:10, 1e-3:30, 1e-5"
batch_size = 2
[output]
out = "{out}"
[samples]
sample_prompts = ["a red circle", "a blue square"]
sample_seeds = [1, 2]
[lora]
rank = 8
"""


def write_toml(tmp_path, text=RUN_TOML):
    (tmp_path / "data").mkdir(exist_ok=True)
    p = tmp_path / "run.toml"
    p.write_text(text.format(data=tmp_path / "data", out=tmp_path / "out"))
    return p


def test_toml_sections_flat_keys_and_method_table(tmp_path):
    cfg = TrainConfig.from_toml(write_toml(tmp_path))
    assert cfg.method == "lora" and cfg.steps == 50 and cfg.batch_size == 2 and cfg.resolution == 32
    assert cfg.lr == "0.005:10, 1e-3:30, 1e-5" and cfg.options.rank == 8 and cfg.options.alpha is None
    assert cfg.sample_prompts == ["a red circle", "a blue square"] and cfg.sample_seeds == [1, 2]
    flat = TrainConfig.from_dict({"steps": 7, "lr": 3e-4, "flip": 0.5, "lora": {"rank": 2}})
    assert (flat.steps, flat.lr, flat.flip, flat.options.rank) == (7, 3e-4, 0.5, 2)


def test_cli_flags_override_the_file(tmp_path):
    cfg = TrainConfig.from_toml(write_toml(tmp_path))
    cfg = cfg.merged({"steps": "80", "lr": "2e-4", "sample_seeds": "3, 4"}, source="command line",
                     method_options={"rank": 16})
    assert cfg.steps == 80 and cfg.lr == 2e-4 and cfg.sample_seeds == [3, 4] and cfg.options.rank == 16
    assert cfg.batch_size == 2  # untouched values stay from the file


def test_written_config_reads_back_identical(tmp_path):
    cfg = TrainConfig.from_toml(write_toml(tmp_path)).replace(vae=None, early_stop="3,0.01", flip=0.25)
    cfg.write(tmp_path / "o")
    again = TrainConfig.from_toml(tmp_path / "o" / "config.toml")
    assert again == cfg
    assert TrainConfig.from_json(tmp_path / "o" / "config.json") == cfg
    doc = json.loads((tmp_path / "o" / "config.json").read_text())
    assert doc["optim"]["steps"] == 50 and doc["lora"]["rank"] == 8 and doc["model"]["vae"] is None


@pytest.mark.parametrize("text, match", [
    ("steps = 'ten'", "steps must be a whole number"),
    ("stepz = 10", "unknown setting 'stepz'; did you mean 'steps'"),
    ("[optim]\nflip = 0.5", "'flip' belongs in \\[augment\\]"),
    ("[lora]\nrnak = 4", "unknown setting 'rnak'"),
    ("method = 'nope'", "method 'nope' is unknown"),
    ("lr = true", "must be a number or a schedule"),
    ("steps = [", "not valid TOML"),
])
def test_bad_toml_values_are_one_line_errors(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(SdtuneError, match=match) as e:
        TrainConfig.from_toml(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("changes, match", [
    ({"steps": 0}, "steps 0 must be at least 1"),
    ({"batch_size": 0}, "batch_size"),
    ({"lr": "1e-3:100, 5e-4:50"}, "must be greater than the previous"),
    ({"lr": 0.0}, "0 everywhere"),
    ({"lr": "1e-3, 1e-4"}, "only the last rate may omit"),
    ({"flip": 1.5}, "probability"),
    ({"val_split": 1.0}, "val_split"),
    ({"resolution": 30}, "multiple of 8"),
    ({"zoom": 1.2}, "needs crop = random"),
    ({"warmup_steps": 5}, "warmup_steps needs lr_scheduler"),
    ({"warmup_steps": 60, "lr_scheduler": "cosine"}, "less than steps"),
    ({"sample_every": 10, "sample_prompts": []}, "no sample prompts"),
    ({"early_stop": "x"}, "patience"),
    ({"early_stop": "3", "save_every": 0}, "needs save_every"),
    ({"select_by": "clip:best"}, ":min or :max"),
    ({"mixed_precision": "fp8"}, "not one of"),
    ({"max_grad_norm": math.inf}, "finite"),
    ({"output_name": "a/b"}, "plain file name"),
    ({"sample_sampler": "No Such Sampler"}, "sample_sampler"),
])
def test_invalid_values_fail_before_training(tmp_path, changes, match):
    cfg = TrainConfig.from_toml(write_toml(tmp_path)).replace(**changes)
    with pytest.raises(SdtuneError, match=match) as e:
        cfg.validate()
    assert "\n" not in str(e.value)


def test_method_option_and_path_checks(tmp_path):
    cfg = TrainConfig.from_toml(write_toml(tmp_path))
    cfg.validate()  # the good config passes and creates the output folder
    assert (tmp_path / "out").is_dir()
    bad_rank = cfg.replace()
    bad_rank.options.rank = 0
    with pytest.raises(SdtuneError, match="rank 0"):
        bad_rank.validate()
    with pytest.raises(SdtuneError, match="data folder .* does not exist"):
        cfg.replace(data=str(tmp_path / "missing")).validate()
    with pytest.raises(SdtuneError, match="model 'nope.safetensors' not found"):
        cfg.replace(model="nope.safetensors").validate()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SdtuneError, match="is a file"):
        cfg.replace(out=str(tmp_path / "file")).validate()
    with pytest.raises(SdtuneError, match="no training data"):
        cfg.replace(data=None).validate()
    with pytest.raises(SdtuneError, match="resume state .* does not exist"):
        cfg.replace(resume=str(tmp_path / "nostate")).validate()


def test_a1111_schedule_parsing_and_values():
    assert parse_lr("0.005:100, 1e-3:1000, 1e-5") == [(0.005, 100), (1e-3, 1000), (1e-5, None)]
    assert parse_lr(2e-4) == [(2e-4, None)]
    assert parse_lr(" 1e-3 : 10 ") == [(1e-3, 10)]
    s = LRSchedule.from_config("0.005:100, 1e-3:1000, 1e-5", "constant", 0, 2000)
    assert [s(1), s(100), s(101), s(1000), s(1001), s(5000)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    ended = LRSchedule.from_config("0.01:5", "constant", 0, 10)
    assert ended(5) == 0.01 and ended(9) == 0.01  # a bounded last piece keeps its rate
    for bad in ("abc", "1e-3:x", "-1", "1e-3:10,,1e-4", "nan", ""):
        with pytest.raises(SdtuneError):
            parse_lr(bad)


def test_scheduler_shapes():
    cos = LRSchedule.from_config(1.0, "cosine", 10, 110)
    assert cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)
    lin = LRSchedule.from_config("2:50, 1", "linear", 0, 100)
    assert lin(25) == pytest.approx(2 * 0.75) and lin(75) == pytest.approx(0.25)
    warm = LRSchedule.from_config(1e-3, "constant_with_warmup", 4, 100)
    assert [warm(i) for i in (1, 2, 4, 50)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])
    assert LRSchedule.from_config(1e-3, "constant", 0, 10)(7) == 1e-3


def test_early_stop_and_select_by_parsing():
    assert parse_early_stop("3") == (3, 0.0)
    assert parse_early_stop("5, 0.01") == (5, 0.01)
    assert parse_early_stop(None) is None and parse_early_stop("0") is None and parse_early_stop("") is None
    for bad in ("a", "3,x", "3,-1", "1,2,3", "-2"):
        with pytest.raises(SdtuneError):
            parse_early_stop(bad)
    assert parse_select_by("val_loss") == ("val_loss", "min")
    assert parse_select_by("judge_shape") == ("judge_shape", "max")
    assert parse_select_by("clip:min") == ("clip", "min")


def test_cli_dry_run_file_flags_and_errors(tmp_path):
    from click.testing import CliRunner

    from sdtune.cli import _register, cli

    _register()
    run = write_toml(tmp_path)
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(run), "--steps", "77", "--rank", "2",
                                 "--sample-prompt", "x", "--sample-seed", "5,6", "--flip", "0.5", "--dry-run"])
    assert r.exit_code == 0, r.output
    import tomllib

    shown = tomllib.loads(r.output)
    assert shown["optim"]["steps"] == 77 and shown["optim"]["batch_size"] == 2  # flag over file, file over default
    assert shown["lora"]["rank"] == 2 and shown["samples"]["sample_prompts"] == ["x"]
    assert shown["samples"]["sample_seeds"] == [5, 6] and shown["augment"]["flip"] == 0.5
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(run), "--lr", "1e-3:0", "--dry-run"])
    assert r.exit_code != 0 and "greater than the previous" in str(r.exception)
    r = CliRunner().invoke(cli, ["train", "lora", "--config", str(run), "--resume", "--dry-run"])
    assert r.exit_code == 0 and 'resume = "auto"' in r.output
