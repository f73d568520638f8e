"""The UI's training API with `processes`: N >= 2 launches torchrun (gloo on this CPU) as a subprocess of the job,
the job follows OUT/log.jsonl, Stop sends SIGTERM to the launcher's process group (one state saved), Resume keeps
the recorded number of processes, and the launcher's exit status becomes the job's state (server.launch)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdtune.training.runlog import read_log, run_outcome

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    from sdtune.cli.ui import build_settings
    from sdtune.server.app import create_app
    from sdtune.toy.testing import write_toy_dataset

    write_toy_dataset(tmp_path / "datasets" / "shapes", 4, size=32)
    settings = build_settings(listen=False, auth=None, no_api=False, datasets=(tmp_path / "datasets",),
                              data_dir=tmp_path, outputs=tmp_path / "outputs", runs=tmp_path / "runs")
    return TestClient(create_app(settings))


# device cpu: gloo, up to 8 processes, whatever GPUs the test machine has
LORA = {"data": "shapes", "resolution": 32, "lr": "1e-3", "save_every": 1000, "tensorboard": False, "device": "cpu"}


def wait_for(client: TestClient, name: str, statuses: tuple[str, ...], timeout: float = 240) -> dict[str, Any]:
    deadline = time.time() + timeout
    run: dict[str, Any] = {}
    while time.time() < deadline:
        run = client.get(f"/sdtune/v1/runs/{name}").json()
        if run.get("status") in statuses:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {name} did not reach {statuses}: {run}")


def test_two_processes_stop_and_resume_through_the_api(client: TestClient, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "duo"
    r = client.post("/sdtune/v1/runs", json={"method": "lora", "name": "duo", "config": {**LORA, "steps": 300},
                                             "processes": 2})
    assert r.status_code == 200, r.text
    assert r.json()["job"]["title"] == "train lora duo (2 processes)"
    deadline, seen = time.time() + 240, 0
    while time.time() < deadline and seen < 2:  # the job's progress follows the run's log
        job = client.get("/sdtune/v1/runs/duo").json()["job"]
        assert job["status"] in ("queued", "running"), job
        seen = job["step"]
        time.sleep(0.2)
    assert seen >= 2 and "processes" in client.get("/sdtune/v1/runs/duo").json()["message"]
    assert client.post("/sdtune/v1/runs/duo/stop").status_code == 200
    stopped = wait_for(client, "duo", ("interrupted", "done", "failed"))
    assert stopped["status"] == "interrupted", stopped["message"]
    records = read_log(out / "log.jsonl")
    last = max(x["step"] for x in records if x["event"] == "step")
    assert (run_outcome(records) or {}).get("stopped") == "interrupted"
    (state,) = [p for p in (out / "state").iterdir() if p.name.startswith("step-")]  # saved once, by rank 0
    assert json.loads((state / "state.json").read_text())["extra"]["processes"] == 2
    assert state.name.startswith(f"step-{last:06d}-")

    # continue it to two more steps (steps may change on resume); Resume keeps the 2 processes it recorded
    toml = out / "config.toml"
    toml.write_text(toml.read_text().replace("steps = 300", f"steps = {last + 2}"))
    r = client.post("/sdtune/v1/runs/duo/resume")
    assert r.status_code == 200 and r.json()["job"]["title"].endswith("(2 processes)"), r.text
    done = wait_for(client, "duo", ("done", "failed", "interrupted"))
    assert done["status"] == "done", done["message"]
    records = read_log(out / "log.jsonl")
    assert [x["step"] for x in records if x["event"] == "step"] == list(range(1, last + 3))
    assert [x["event"] for x in records if x["event"] in ("end", "resume")] == ["resume", "end"]
    assert (run_outcome(records) or {}).get("stopped") == "finished" and (out / "lora.safetensors").is_file()
    assert done["summary"]["final"] == "lora.safetensors" and (out / "launch.log").is_file()


def test_processes_out_of_bounds_are_refused_before_queueing(client: TestClient,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sdtune.server.launch.cuda_devices", lambda: 0)  # a CPU-only machine
    for processes, says in ((0, "use 1 to 8"), (9, "use 1 to 8"), (-2, "use 1 to 8")):
        r = client.post("/sdtune/v1/runs", json={"method": "lora", "name": "b", "config": {**LORA, "steps": 2},
                                                 "processes": processes})
        assert r.status_code == 422 and says in r.json()["errors"], r.text
    r = client.post("/sdtune/v1/runs", json={"method": "lora", "name": "b", "processes": 2,
                                             "config": {**LORA, "steps": 2, "device": "cuda:1"}})
    assert r.status_code == 422 and "one GPU each" in r.json()["errors"]
    r = client.post("/sdtune/v1/runs", json={"method": "lora", "name": "b", "config": LORA, "processes": "two"})
    assert r.status_code == 422
    assert client.get("/sdtune/v1/jobs").json()["queued"] == [] and client.get("/sdtune/v1/runs").json() == []
    schema = client.get("/sdtune/v1/schema").json()["processes"]
    assert schema["max"] == 8 and schema["default"] == 1 and "per process" in schema["help"]


def test_a_launch_that_fails_fails_its_job_with_the_error_line(client: TestClient,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # the launcher's exit status decides the job's state; its last `error:` line is the job's error
    script = "import sys; print('some output'); print('error: data folder x is empty; add images'); sys.exit(1)"
    monkeypatch.setattr("sdtune.server.launch.command", lambda config, n, resume: [sys.executable, "-c", script])
    r = client.post("/sdtune/v1/runs", json={"method": "lora", "name": "f", "config": {**LORA, "steps": 2},
                                             "processes": 2})
    assert r.status_code == 200
    run = wait_for(client, "f", ("failed", "done"), timeout=60)
    assert run["status"] == "failed" and "data folder x is empty" in run["message"] and "2-process" in run["message"]
