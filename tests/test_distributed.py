"""Training as two processes (torchrun, gloo on the CPU) trains what one process trains with the same global
batch: LoRA and textual inversion, per-step losses and final weights equal up to float reduction order (a batch of 2
through the UNet at once vs two batches of 1), a resumed 2-process run continues exactly, and the output folder holds
one set of files (only the main process writes; the TI runs keep their latents on disk, written by rank 0). See docs/multi_gpu.md and `training.distributed`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli.testing import exit_code
from sdtune.toy.testing import write_toy_dataset
from sdtune.training.distributed import Ranks
from sdtune.training.runlog import step_losses

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]
# Adam's update m / (sqrt(v) + eps) turns float-order differences of near-zero gradients into weight differences of
# up to lr per step; measured: 2.3e-6 (LoRA) after 4 steps at lr 1e-3. A wrong shard or noise row gives ~lr.
TOLERANCE = 5e-5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(runs: list[list[str]], processes: int = 2, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(_port()), str(ROOT / "tests" / "dist_worker.py"), json.dumps(runs)]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)


def _lora(data: Path, out: Path, batch: int, steps: int, *extra: str) -> list[str]:
    return ["train", "lora", "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size",
            str(batch), "--save-every", "2", "--val-split", "0.25", "--lr", "1e-3", "--no-progress",
            "--no-tensorboard", *extra]


def _ti(data: Path, out: Path, batch: int, steps: int) -> list[str]:
    return ["train", "ti", "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size",
            str(batch), "--save-every", "2", "--lr", "5e-3", "--token", "<star>", "--init", "shape", "--vectors", "2", "--val-split", "0.25",
            "--latent-cache", "disk",
            "--no-progress", "--no-tensorboard"]


def _files(out: Path) -> set[str]:
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    return {n if not n.startswith("state/step-") else "state/" + n.split("/", 2)[2] for n in names}


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert set(x) == set(y)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def _state_weights(out: Path) -> Path:
    (folder,) = [p for p in (out / "state").iterdir() if p.name.startswith("step-")]
    return folder / "weights.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process with batch 2, and two processes with batch 1 each (LoRA: 2 steps, then resumed to 4); last, a
    2-process LoRA run (OUT/nan) whose rank 1 gets a NaN loss at step 3 (its output in OUT/nan.stderr)."""
    root = tmp_path_factory.mktemp("dist")
    data = write_toy_dataset(root / "data", 4, size=32)  # 3 training images: the last batch of an epoch has 1
    for argv in (_lora(data, root / "lora1", 2, 4), _ti(data, root / "ti1", 2, 4)):
        assert exit_code(argv) == 0
    done = _launch([_lora(data, root / "lora2", 1, 2), _ti(data, root / "ti2", 1, 4)])
    assert done.returncode == 0, done.stderr[-3000:]
    done = _launch([_lora(data, root / "lora2", 1, 4, "--resume"), _lora(data, root / "nan", 1, 4)],
                   SDTUNE_TEST_NAN="1:3:nan")  # rank 1 only, step 3, the run into OUT/nan only
    (root / "nan.stderr").write_text(done.stderr)
    return root


@pytest.mark.parametrize("method", ["lora", "ti"])
def test_two_processes_train_what_one_process_trains(runs: Path, method: str) -> None:
    one, two = runs / f"{method}1", runs / f"{method}2"
    l1, l2 = step_losses(one / "log.jsonl"), step_losses(two / "log.jsonl")
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-8)
    assert _max_diff(_state_weights(one), _state_weights(two)) <= TOLERANCE
    final = next(p.name for p in one.iterdir() if p.suffix in (".safetensors", ".pt") and p.is_file())
    assert _max_diff(one / final, two / final) <= TOLERANCE
    summary1, summary2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert summary1["best_step"] == summary2["best_step"]
    assert len(summary1["checkpoints"]) == len(summary2["checkpoints"]) == 2
    for r1, r2 in zip(summary1["checkpoints"], summary2["checkpoints"]):
        assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-5)


def test_one_set_of_files_and_one_log(runs: Path) -> None:
    for method in ("lora", "ti"):
        two, one = _files(runs / f"{method}2"), _files(runs / f"{method}1")
        assert two == one, (sorted(two - one), sorted(one - two))
        records = [json.loads(line) for line in (runs / f"{method}2" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3, 4]  # one writer
        assert [r["step"] for r in records if r["event"] == "checkpoint"] == [2, 4]


def test_resumed_two_process_run_records_its_processes(runs: Path) -> None:
    state = json.loads((_state_weights(runs / "lora2").parent / "state.json").read_text())
    assert state["extra"]["processes"] == 2
    events = [json.loads(line)["event"] for line in (runs / "lora2" / "log.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("checkpoint") == 2


def test_shards_cover_the_global_batch() -> None:
    for n in range(1, 7):
        for world in (1, 2, 3):
            spans = [Ranks(r, world).shard(n) for r in range(world)]
            rows = [i for a, b in spans for i in range(a, b)]
            assert rows == list(range(n))
    assert Ranks(1, 2).shard(1) == (1, 1)  # nothing for rank 1: it trains with weight 0


def test_noise_of_a_shard_is_its_rows_of_the_global_batch() -> None:
    from sdtune.training.noise import NoiseModel, step_generator

    model = NoiseModel({"num_train_timesteps": 1000}, "epsilon", noise_offset=0.1)
    full, t = model.sample(torch.zeros(3, 4, 8, 8), step_generator(0, 5))
    part, tp = model.sample(torch.zeros(1, 4, 8, 8), step_generator(0, 5), total=3, offset=2)
    assert torch.equal(part, full[2:3]) and torch.equal(tp, t[2:3])


def test_a_nan_on_one_rank_rolls_every_rank_back(runs: Path) -> None:
    out = runs / "nan"
    # every rank stopped (a rank left waiting would have hit the launch's timeout instead)
    stderr = (runs / "nan.stderr").read_text()
    assert "training diverged at step 3: non-finite loss; rolled back to the state of step 2" in stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (diverged,) = [r for r in records if r["event"] == "diverged"]
    assert diverged["rolled_back_to"] == 2
    assert [p.name[:11] for p in (out / "state").iterdir() if p.name.startswith("step-")] == ["step-000002"]


@pytest.mark.parametrize("var,engine", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_a_deepspeed_or_fsdp_launch_is_one_line_error_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch, var: str,
                                                                      engine: str) -> None:
    # `accelerate launch --use_deepspeed` / `--use_fsdp` sets these for the processes it starts; sdtune would train
    # as plain data parallel with nothing sharded, so it refuses before the model loads.
    from sdtune.cli.testing import run_cli

    data = write_toy_dataset(tmp_path / "data", 2, size=32)
    monkeypatch.setenv(var, "true")
    monkeypatch.setattr("sdtune.training.setup.TrainerSetup._prepare_model",
                        lambda self: pytest.fail("the model was loaded"))
    r = run_cli(_lora(data, tmp_path / "out", 1, 2), capsys)
    assert r.code == 2, r.text
    lines = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and engine in lines[0] and "torchrun" in lines[0] and "Traceback" not in r.err
