"""Never losing progress: the state folder's atomic layout, kill -9 at any moment, SIGTERM, and the CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.training import TrainConfig, train
from sdtune.training.checkpoint import (StateStore, TrainState, capture_rng, optimizer_from_files, optimizer_to_files,
                                        restore_rng)
from sdtune.training.runlog import read_log
from sdtune.toy.testing import write_toy_dataset


def state(step, value=1.0):
    return TrainState(step=step, epoch=0, cursor=step, weights={"w": torch.full((3,), value)},
                      optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, rng=capture_rng())


def test_state_store_latest_pointer_fallback_prune_and_temp_cleanup(tmp_path):
    store = StateStore(tmp_path / "state", keep=2)
    for s in (1, 2, 3):
        store.save(state(s, float(s)))
    assert [p.name.split("-")[1] for p in store.complete()] == ["000002", "000003"]  # keep=2
    assert store.load().step == 3 and torch.equal(store.load().weights["w"], torch.full((3,), 3.0))
    # a crash after the folder rename but before the pointer update: `latest` still names step 3
    (tmp_path / "state" / "latest").write_text("step-000099-dead\n")  # a stale pointer
    assert store.load().step == 3  # falls back to the newest complete state
    (tmp_path / "state" / "latest").unlink()
    assert store.latest().name.startswith("step-000003-")
    half = tmp_path / "state" / ".tmp-step-000004-abc"
    half.mkdir()
    (half / "weights.safetensors").write_bytes(b"partial")
    assert store.load().step == 3  # half-written folders are never loaded
    store.clean_temp()
    assert not half.exists()
    incomplete = tmp_path / "state" / "step-000005-abc"
    incomplete.mkdir()  # no state.json: not a state
    assert store.latest().name.startswith("step-000003-")
    with pytest.raises(SdtuneError, match="no saved training state"):
        StateStore(tmp_path / "empty").load()


@pytest.mark.parametrize("damaged", ["weights.safetensors", "snapshots.safetensors"])
def test_snapshots_round_trip_and_a_damaged_state_file_is_a_one_line_error(tmp_path, damaged):
    store = StateStore(tmp_path / "state")
    saved = state(4)
    saved.snapshots = [{"w": torch.full((3,), 1.0)}, {"w": torch.full((3,), 2.0)}]
    folder = store.save(saved)
    loaded = store.load()
    assert [s["w"].tolist() for s in loaded.snapshots] == [[1.0] * 3, [2.0] * 3]
    StateStore(tmp_path / "plain").save(state(1))  # no snapshots: no file, and none loaded
    assert StateStore(tmp_path / "plain").load().snapshots == []
    (folder / damaged).write_bytes(b"garbage")
    with pytest.raises(SdtuneError, match=f"is damaged .*{damaged}"):
        store.load()


def test_optimizer_state_and_rng_round_trip():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=1e-2)
    p.grad = torch.ones(4)
    opt.step()
    tensors, rest = optimizer_to_files(opt.state_dict())
    json.dumps(rest)  # the non-tensor part is plain JSON
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-2)
    opt2.load_state_dict(optimizer_from_files(tensors, json.loads(json.dumps(rest))))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    saved = capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    as_json = json.loads(json.dumps({k: v for k, v in saved.items() if k != "torch"}))  # how state.json keeps them
    restore_rng({**as_json, "torch": saved["torch"]})
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    first = StateStore(tmp_path / "state")
    first.lock()
    try:
        with pytest.raises(SdtuneError, match="another training run is writing"):
            StateStore(tmp_path / "state").lock()
    finally:
        first.unlock()
    StateStore(tmp_path / "state").lock()  # free again


# -------------------------------------------------------------------------------------- real processes

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from sdtune.models.testing import tiny_pipeline

    d = tmp_path_factory.mktemp("tiny_sd1")
    tiny_pipeline("sd1").save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("data"), 3, size=32)


def start(model_dir, data, out, *extra):
    cmd = [sys.executable, "-m", "sdtune", "train", "lora", "--model", str(model_dir), "--data", str(data),
           "--out", str(out), "--resolution", "32", "--lr", "1e-3", "--device", "cpu", "--no-progress",
           "--no-tensorboard", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_steps(proc, out, n, *, need_state=True, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [r["step"] for r in read_log(out / "log.jsonl") if r.get("event") == "step"]
        if steps and steps[-1] >= n and (not need_state or StateStore(out / "state").latest() is not None):
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not reach the step in time")


def test_kill_9_leaves_a_loadable_state_and_resume_continues(tmp_path, model_dir, data):
    out = tmp_path / "out"
    proc = start(model_dir, data, out, "--steps", "500", "--save-every", "1", "--keep-states", "2")
    try:
        logged = wait_for_steps(proc, out, 4)
        time.sleep(0.13)  # somewhere inside a later step or save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    st = StateStore(out / "state").load()
    # A step's log line is written before its state is saved: the kill may land between the two, and then the
    # last completed state is the step before (that is the guarantee: the last completed checkpoint loads).
    assert st.step >= logged - 1 and st.weights and all(torch.isfinite(v).all() for v in st.weights.values())
    assert st.config["optim"]["steps"] == 500
    cfg = TrainConfig.from_dict(st.config).replace(steps=st.step + 2, resume="auto", progress=False)
    r = train(cfg, echo=lambda s: None)
    assert r.stopped == "finished" and r.step == st.step + 2
    steps = [x["step"] for x in read_log(out / "log.jsonl") if x["event"] == "step"]
    assert steps == list(range(1, st.step + 3))  # one record per step, no gap, no duplicate
    assert not [p for p in (out / "state").iterdir() if p.name.startswith(".tmp-")]


def test_sigterm_saves_the_state_and_exits_cleanly(tmp_path, model_dir, data):
    out = tmp_path / "out"
    proc = start(model_dir, data, out, "--steps", "500", "--save-every", "1000")
    try:
        wait_for_steps(proc, out, 2, need_state=False)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM" in err and "continue with --resume" in err and "Traceback" not in err
    records = read_log(out / "log.jsonl")
    last_step = max(r["step"] for r in records if r["event"] == "step")
    st = StateStore(out / "state").load()
    assert st.step == last_step >= 2  # no checkpoint was due (save_every 1000): the signal saved this state
    assert any(r["event"] == "interrupted" for r in records)
    # the CLI continues it with the saved settings: only --out and --resume are needed
    proc = subprocess.run([sys.executable, "-m", "sdtune", "train", "lora", "--out", str(out), "--resume",
                           "--steps", str(last_step + 1), "--save-every", "1"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming at step {last_step}" in proc.stderr
    assert (out / "lora.safetensors").is_file()
    assert [r["step"] for r in read_log(out / "log.jsonl") if r["event"] == "step"] == list(range(1, last_step + 2))


def test_resuming_with_fewer_steps_than_done_says_nothing_is_trained(tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert start(model_dir, data, out, "--steps", "3").wait(timeout=240) == 0
    again = start(model_dir, data, out, "--steps", "2", "--resume", "auto")
    _, err = again.communicate(timeout=240)
    assert again.returncode == 0 and "already at step 3, --steps is 2: nothing to train" in err, err


def test_linking_the_final_file_again_leaves_no_temporary_file(tmp_path):
    # A resumed run whose best checkpoint did not change links the same file over itself: rename() of two links to
    # one file is a no-op, which used to leave OUT/.<name>.<pid>.tmp behind.
    from sdtune.training.checkpoint import link_or_copy

    src = tmp_path / "checkpoints" / "a-000002.safetensors"
    src.parent.mkdir()
    src.write_bytes(b"weights")
    dst = tmp_path / "a.safetensors"
    link_or_copy(src, dst)
    link_or_copy(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "checkpoints"]
    assert dst.read_bytes() == b"weights"
