"""`sdtune recipe wrong-lora` through the UI's training API (issue 21's acceptance): a job on the queue writing into
the runs folder, its progress and result read back, its files served confined to the run, and bad settings refused
before anything queues."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors import safe_open

from sdtune.recipes.wrong_lora import VARIANTS

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning", "ignore::RuntimeWarning"),
              pytest.mark.usefixtures("hash_cache")]

SMALL: dict[str, Any] = {"images": 3, "sampling_steps": 2, "compare_seeds": 1,
                         "held_out": ["a blue square on a gray background"],
                         "train": {"steps": 3, "batch_size": 2, "rank": 2}}


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    from sdtune.cli.ui import build_settings
    from sdtune.server.app import create_app

    (tmp_path / "datasets").mkdir()
    settings = build_settings(listen=False, auth=None, no_api=False, datasets=(tmp_path / "datasets",),
                              data_dir=tmp_path, outputs=tmp_path / "outputs", runs=tmp_path / "runs")
    return TestClient(create_app(settings))


def test_wrong_lora_recipe_through_the_api(client: TestClient, tmp_path: Path) -> None:
    r = client.post("/sdtune/v1/recipes/wrong-lora", json={"name": "neg", "settings": SMALL})
    assert r.status_code == 200, r.text
    assert r.json()["job"]["kind"] == "recipe"
    deadline, doc = time.time() + 300, {}
    while time.time() < deadline:
        doc = client.get("/sdtune/v1/recipes/wrong-lora/neg").json()
        if doc["status"] in ("done", "failed"):
            break
        time.sleep(0.3)
    assert doc["status"] == "done", doc.get("message")
    out = tmp_path / "runs" / "neg"  # the configured runs folder, as a training run
    assert len(list((out / "bad_images").glob("*.png"))) == 3
    with safe_open(str(out / "wrong.safetensors"), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
    assert list(doc["report"]["variants"]) == list(VARIANTS)
    for entry in doc["report"]["variants"].values():  # the toy judge on the tiny model, as the CLI
        assert 0.0 <= entry["figures"]["agreement"] <= 1.0
    assert doc["settings"]["images"] == 3 and doc["settings"]["train"]["steps"] == 3
    assert any("comparison: base" in m for m in doc["messages"]) and doc["files"]["lora"] == "wrong.safetensors"
    grid = client.get("/sdtune/v1/runs/neg/file", params={"path": doc["files"]["grid"]})
    assert grid.status_code == 200 and grid.content[:4] == b"\x89PNG"
    jobs = client.get("/sdtune/v1/jobs").json()
    assert [j["title"] for j in jobs["recent"]] == ["recipe wrong-lora neg"]


def test_stop_ends_the_recipe_resumable(client: TestClient, tmp_path: Path) -> None:
    # Stop while the bad images are made: the job ends interrupted, the images made so far stay, and the same
    # request continues it (only the missing images are made)
    settings = {**SMALL, "images": 40}
    assert client.post("/sdtune/v1/recipes/wrong-lora", json={"name": "st", "settings": settings}).status_code == 200
    images = tmp_path / "runs" / "st" / "bad_images"
    deadline = time.time() + 120
    while time.time() < deadline and not list(images.glob("*.png")):
        time.sleep(0.05)
    assert client.post("/sdtune/v1/recipes/wrong-lora/st/stop").status_code == 200
    while time.time() < deadline and client.get("/sdtune/v1/recipes/wrong-lora/st").json()["status"] == "running":
        time.sleep(0.1)
    doc = client.get("/sdtune/v1/recipes/wrong-lora/st").json()
    assert doc["status"] == "interrupted" and "rerun it to continue" in doc["messages"][-1]
    assert 1 <= len(list(images.glob("*.png"))) < 40 and not (tmp_path / "runs" / "st" / "train").exists()
    assert client.post("/sdtune/v1/recipes/wrong-lora/st/stop").status_code == 422  # not running any more


@pytest.mark.parametrize("body,says", [
    ({"name": "x", "settings": {**SMALL, "imagez": 3}}, "unknown recipe setting 'imagez'"),
    ({"name": "x", "settings": {**SMALL, "images": 0}}, "--images 0 is out of range"),
    ({"name": "x", "settings": {**SMALL, "train": {"stepz": 3}}}, "stepz"),
    ({"name": "x", "settings": {**SMALL, "train": {"steps": -1}}}, "steps -1 must be at least 1"),  # not a folder
    ({"name": "x", "settings": {**SMALL, "images": None}}, "recipe setting 'images' None"),  # the UI's empty field
    ({"name": "x", "settings": {**SMALL, "cfg": "high"}}, "recipe setting 'cfg' 'high'"),
    ({"name": "x", "settings": {**SMALL, "out": "/tmp/elsewhere"}}, "unknown recipe setting 'out'"),
    ({"name": "../x", "settings": SMALL}, "run name"),
    ({"name": "x", "model": "nope", "settings": SMALL}, "nope"),
])
def test_bad_recipe_settings_are_refused_before_queueing(client: TestClient, tmp_path: Path,
                                                         body: dict[str, Any], says: str) -> None:
    r = client.post("/sdtune/v1/recipes/wrong-lora", json=body)
    assert r.status_code == 422 and says in r.json()["errors"], r.text
    assert client.get("/sdtune/v1/jobs").json()["recent"] == [] and not (tmp_path / "runs" / "x").exists()
    assert client.get("/sdtune/v1/recipes/wrong-lora/x").status_code == 404  # no such recipe


def test_the_status_message_is_the_whole_last_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the recipe's last message is several lines (how to use the LoRA): the status shows all of it, not its last
    # line alone (which started mid-sentence: "   or A1111: put <lora:wrong:1> ...")
    from types import SimpleNamespace

    import sdtune.recipes.wrong_lora as wrong_lora
    from sdtune.server.jobs import JobQueue
    from sdtune.server.recipes import RecipeRegistry

    def fake_run(settings: Any, *, evaluate: Any, echo: Any, stop: Any) -> Any:
        echo("training")
        echo("wrote wrong.safetensors\nuse it: sdtune generate ...\n   or A1111: put <lora:wrong:1> ...")
        return SimpleNamespace(lora="wrong.safetensors", images=1, report={})

    monkeypatch.setattr(wrong_lora, "run_wrong_lora", fake_run)
    registry = RecipeRegistry(JobQueue())
    job = registry.start(SimpleNamespace(out=str(tmp_path / "runs" / "w")), None)
    job.future.result(timeout=30)
    doc = registry.read(tmp_path / "runs", "w")
    assert doc["status"] == "done"
    assert doc["message"] == "wrote wrong.safetensors\nuse it: sdtune generate ...\n   or A1111: put <lora:wrong:1> ..."
    assert doc["messages"][-3:] == doc["message"].splitlines()  # the log keeps one line an entry
