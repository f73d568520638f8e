"""`sdtune ui`'s HTTP API with an HTTP client: A1111's /sdapi/v1 (field names, semantics, errors) and sdtune's
/sdtune/v1 (training runs, datasets, helpers), path confinement, auth and origin checks, the job queue under load."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folders as an A1111 install lays them out, with a LoRA (and its preview), a hypernetwork, an
    embedding and a small diffusers model, plus a toy dataset."""
    from sdtune.adapters.hypernetwork.network import Hypernetwork
    from sdtune.adapters.hypernetwork.io import save_hypernetwork
    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import random_network
    from sdtune.adapters.textual_inversion.files import Embedding, write_embedding
    from sdtune.models import load_model
    from sdtune.toy.testing import write_toy_dataset

    root = tmp_path_factory.mktemp("a1111")
    for sub in ("models/Stable-diffusion", "models/VAE", "models/Lora", "models/hypernetworks", "embeddings"):
        (root / sub).mkdir(parents=True)
    tiny = load_model("tiny")
    save_lora(random_network(tiny.pipe, seed=1, scale=0.5), root / "models/Lora/ink.safetensors")
    Image.new("RGB", (8, 8), "red").save(root / "models/Lora/ink.preview.png")
    save_hypernetwork(Hypernetwork(_widths(tiny.pipe), name="sketch"), root / "models/hypernetworks/sketch.pt",
                      format="a1111")
    width = tiny.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    write_embedding(Embedding(name="shiny", vectors={"*": torch.randn(2, width) * 0.01}),
                    root / "embeddings/shiny.safetensors")
    data = write_toy_dataset(root / "datasets" / "stars", 3, size=64, shapes=("star",),
                             caption="a {colour} star")
    return {"root": root, "data": data}


def _widths(pipe):
    from sdtune.adapters.hypernetwork.apply import context_widths

    return context_widths(pipe.unet)


def make_client(world, tmp_path, **settings):
    from sdtune.cli.ui import build_settings
    from sdtune.server.app import create_app

    options = dict(listen=False, auth=None, no_api=False, datasets=(world["root"] / "datasets",),
                   data_dir=world["root"], outputs=tmp_path / "outputs", runs=tmp_path / "runs")
    options.update(settings)
    return TestClient(create_app(build_settings(**options)))


@pytest.fixture(scope="module")
def client(world, tmp_path_factory):
    return make_client(world, tmp_path_factory.mktemp("server"))


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


QUICK = {"prompt": "a red circle on a white background", "steps": 4, "seed": 11}


# ------------------------------------------------------------------------------------------------------ txt2img

def test_txt2img_returns_a1111_fields_and_the_python_api_images(client):
    from sdtune.generate import GenerationParams, Generator

    r = client.post("/sdapi/v1/txt2img", json={**QUICK, "batch_size": 2, "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 2
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12] and info["seed"] == 11 and info["sampler_name"] == "Euler a"
    assert info["sd_model_name"] == "tiny" and info["index_of_first_image"] == 0
    assert body["parameters"]["prompt"] == QUICK["prompt"]
    first = decode(body["images"][0])
    assert first.info["parameters"] == info["infotexts"][0] and "Seed: 11" in info["infotexts"][0]
    same = Generator("tiny").generate(GenerationParams(prompt=QUICK["prompt"], steps=4, seed=11, batch_size=2,
                                                       sampler="Euler a"))
    assert first.convert("RGB").tobytes() == same[0].image.tobytes()  # no second code path


def test_txt2img_a1111_defaults_and_scheduler_names(client):
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 1}).json()["info"])
    assert info["sampler_name"] == "Euler"  # A1111's API default
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 1,
                                                             "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                                                             "restore_faces": False, "eta": 1.0,
                                                             "some_future_field": 3}).json()["info"])
    assert info["sampler_name"] == "DPM++ 2M Karras"


@pytest.mark.parametrize("body,words", [
    ({"steps": 0}, "steps"), ({"steps": 100000}, "steps"), ({"width": 100000}, "width"),
    ({"batch_size": 1000000}, "batch_size"), ({"enable_hr": True}, "enable_hr"), ({"restore_faces": True}, "restore"),
    ({"sampler_name": "Nope"}, "sampler"), ({"scheduler": "Exponential"}, "scheduler"),
    ({"alwayson_scripts": {"controlnet": {}}}, "alwayson_scripts"), ({"s_churn": 0.5}, "s_churn"),
    ({"width": 65}, "multiple of 8"), ({"override_settings": {"sd_model_checkpoint": "missing"}}, "not found"),
    ({"refiner_checkpoint": "missing_refiner"}, "not found"), ({"refiner_checkpoint": "tiny"}, "SDXL"),
])
def test_bad_requests_are_one_line_422s(client, body, words):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **body})
    assert r.status_code == 422
    assert words in r.json()["errors"] and "\n" not in r.json()["errors"] and "Traceback" not in r.text


def test_save_images_writes_a1111_pngs_into_outputs(world, tmp_path):
    c = make_client(world, tmp_path)
    info = json.loads(c.post("/sdapi/v1/txt2img", json={**QUICK, "save_images": True}).json()["info"])
    saved = [Path(p) for p in info["saved_files"]]
    assert len(saved) == 1 and saved[0].is_file() and (tmp_path / "outputs") in saved[0].parents
    assert Image.open(saved[0]).info["parameters"] == info["infotexts"][0]


# ------------------------------------------------------------------------------------------------------ listings

def test_listings_in_a1111_shapes(client, world):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "DPM++ 2M Karras" in names and "Euler a" in names
    models = client.get("/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "tiny" and {"title", "hash", "filename", "config"} <= set(models[0])
    assert client.get("/sdapi/v1/sd-vae").json() == []
    loras = client.get("/sdapi/v1/loras").json()
    assert [(x["name"], x["alias"]) for x in loras] == [("ink", "ink")]
    from sdtune.formats.safe_io import read_safetensors_metadata
    on_disk = read_safetensors_metadata(loras[0]["path"])  # A1111 gives the file's metadata (ss_* keys, ...)
    assert on_disk and set(loras[0]["metadata"]) == set(on_disk)
    assert [x["name"] for x in client.get("/sdapi/v1/hypernetworks").json()] == ["sketch"]
    emb = client.get("/sdapi/v1/embeddings").json()
    assert set(emb) == {"loaded", "skipped"} and emb["loaded"]["shiny"]["vectors"] == 2
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200


def test_lora_tags_from_the_lora_folder_change_the_image_and_the_infotext(client):
    base = client.post("/sdapi/v1/txt2img", json=QUICK).json()
    tagged = client.post("/sdapi/v1/txt2img", json={**QUICK, "prompt": QUICK["prompt"] + " <lora:ink:1>"}).json()
    assert base["images"][0] != tagged["images"][0]
    assert "Lora hashes" in json.loads(tagged["info"])["infotexts"][0]


def test_options_get_and_post(client):
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == "tiny" and opts["sd_vae"] == "Automatic"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nothing.safetensors"})
    assert r.status_code == 422 and "not found" in r.json()["errors"]
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 99})
    assert r.status_code == 422


def test_png_info_round_trip(client):
    image = client.post("/sdapi/v1/txt2img", json=QUICK).json()["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert r["parameters"]["Prompt"] == QUICK["prompt"] and r["parameters"]["Seed"] == "11"
    assert r["info"].startswith(QUICK["prompt"]) and r["items"]["parameters"] == r["info"]
    bad = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"not an image").decode()})
    assert bad.status_code == 422
    w, h = decode(image).size  # A1111's parse_generation_parameters splits "Size: WxH" into Size-1 / Size-2
    assert (r["parameters"]["Size-1"], r["parameters"]["Size-2"]) == (str(w), str(h)) and "Size" not in r["parameters"]


@pytest.mark.parametrize("path,kind", [("/sdapi/v1/txt2img", "application/x-www-form-urlencoded"),
                                       ("/sdapi/v1/png-info", "text/plain"), ("/sdapi/v1/options", None)])
def test_a_body_not_sent_as_json_is_a_422_that_says_so(client, path, kind):
    """curl -d sends a form type by default: FastAPI then reads raw bytes, which the error handler must not choke on."""
    headers = {"content-type": kind} if kind else {}
    r = client.post(path, content=b'{"prompt": "x"}', headers=headers)
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["errors"], r.text
    assert "Traceback" not in r.text


def test_framework_refusals_have_a1111_error_shape(client):
    r = client.get("/sdapi/v1/no-such-endpoint")
    assert r.status_code == 404 and r.json()["error"] == "HTTPException" and r.json()["errors"]
    r = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "' + bytes([0xFF]) + b'"}',
                    headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["error"] in ("HTTPException", "ValidationError"), r.text


@pytest.mark.parametrize("where,settings", [
    ("override", {"eta_noise_seed_delta": 31337}), ("override", {"eta_ancestral": 0.5}),
    ("override", {"randn_source": "NV"}), ("options", {"samples_format": "jpg"}), ("options", {"s_noise": 0.9}),
])
def test_options_that_change_the_pixels_are_refused_unless_at_sdtunes_value(client, where, settings):
    if where == "override":
        r = client.post("/sdapi/v1/txt2img", json={**QUICK, "override_settings": settings})
    else:
        r = client.post("/sdapi/v1/options", json=settings)
    key = next(iter(settings))
    assert r.status_code == 422 and key in r.json()["errors"], r.text
    current = client.get("/sdapi/v1/options").json()
    assert current[key] != settings[key]  # nothing was applied; and sending back what GET says is accepted
    assert client.post("/sdapi/v1/txt2img", json={**QUICK, "override_settings": {key: current[key]}}).status_code == 200


def test_a_run_or_file_that_does_not_exist_is_a_404(client):
    r = client.get("/sdtune/v1/runs/nope")
    assert r.status_code == 404 and r.json()["errors"] == "no run 'nope'"
    assert client.get("/sdtune/v1/runs/nope/file", params={"path": "x.png"}).status_code == 404


def test_start_up_listings_a1111_clients_read_are_answered_empty(client):
    for path in ("prompt-styles", "upscalers", "latent-upscale-modes", "face-restorers", "extensions"):
        r = client.get(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.json() == [], path
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_samplers_listed_are_the_ones_that_run_and_karras_needs_a_karras_variant(client):
    from sdtune.generate.samplers import get_sampler, usable

    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert all(usable(get_sampler(n)) for n in names)
    r = client.post("/sdapi/v1/txt2img", json={**QUICK, "sampler_name": "Euler", "scheduler": "karras"})
    assert r.status_code == 422 and "'Euler' has no" in r.json()["errors"] and "DPM++ 2M" in r.json()["errors"]


def test_progress_idle_shape_and_interrupt_skip_answer(client):
    p = client.get("/sdapi/v1/progress").json()
    assert p["progress"] == 0 and {"sampling_step", "sampling_steps", "job_count"} <= set(p["state"])
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    assert client.post("/sdapi/v1/skip").status_code == 200


def test_interrupt_during_a_queue_leaves_the_server_usable(world, tmp_path):
    c = make_client(world, tmp_path)
    results = {}

    def slow():
        results["slow"] = c.post("/sdapi/v1/txt2img", json={**QUICK, "steps": 400, "n_iter": 3})

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.time() + 60
    seen = None
    while time.time() < deadline:
        seen = c.get("/sdapi/v1/progress").json()
        if seen["state"]["sampling_step"] > 100:  # past the first live preview (every steps / 5)
            break
        time.sleep(0.05)
    assert seen["progress"] > 0 and seen["eta_relative"] > 0 and seen["state"]["sampling_steps"] == 400
    assert seen["state"]["job_count"] == 3 and seen["state"]["job_no"] == 0  # A1111: n_iter batches are its jobs
    assert decode(seen["current_image"]).format == "PNG"  # the live preview
    assert c.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    c.post("/sdapi/v1/interrupt")
    t.join(60)
    assert results["slow"].status_code == 200
    assert len(results["slow"].json()["images"]) == 1  # the interrupted image is returned; later batches never ran
    after = c.post("/sdapi/v1/txt2img", json=QUICK)
    assert after.status_code == 200 and len(after.json()["images"]) == 1


def test_fifty_concurrent_requests_come_back_in_order_with_their_own_images(world, tmp_path):
    import psutil

    c = make_client(world, tmp_path)
    seeds = list(range(100, 150))
    alone = {s: c.post("/sdapi/v1/txt2img", json={**QUICK, "steps": 2, "seed": s}).json()["images"][0]
             for s in seeds[:5]}

    def burst():
        out = {}

        def one(s):
            out[s] = c.post("/sdapi/v1/txt2img", json={**QUICK, "steps": 2, "seed": s})

        threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return out

    first = burst()
    rss = psutil.Process().memory_info().rss
    second = burst()
    grown = psutil.Process().memory_info().rss - rss
    for out in (first, second):
        assert all(r.status_code == 200 for r in out.values()) and len(out) == 50
        assert all(json.loads(out[s].json()["info"])["seed"] == s for s in seeds)
    assert all(first[s].json()["images"][0] == alone[s] for s in alone)  # exactly the images of one at a time
    assert all(first[s].json()["images"][0] == second[s].json()["images"][0] for s in seeds)
    jobs = [j for j in c.app.state.sdtune.jobs.jobs.values() if j.kind == "txt2img"]
    finished = [j.finished for j in jobs]
    assert finished == sorted(finished)  # served first come, first served
    assert grown < 150 * 2**20, f"memory grew {grown / 2**20:.0f} MB over 50 more requests"


# ------------------------------------------------------------------------------------------------------ safety

def test_paths_in_requests_stay_inside_the_configured_folders(client, world, tmp_path):
    (world["root"] / "datasets" / "escape").symlink_to(tmp_path, target_is_directory=True)
    for url in ("/sdtune/v1/datasets?path=../../etc", "/sdtune/v1/datasets?path=/etc",
                "/sdtune/v1/datasets?path=escape", "/sdtune/v1/outputs?path=../x.png",
                "/sdtune/v1/runs/x/file?path=../../secret"):
        r = client.get(url)
        assert r.status_code in (403, 422), (url, r.status_code)
        assert "Traceback" not in r.text
    r = client.post("/sdtune/v1/runs", json={"method": "ti", "name": "../evil", "config": {}})
    assert r.status_code == 422 and "run name" in r.json()["errors"]


def test_a_run_on_an_empty_dataset_folder_is_refused_before_it_is_queued(world, tmp_path):
    (world["root"] / "datasets" / "nothing").mkdir()
    client = make_client(world, tmp_path)
    r = client.post("/sdtune/v1/runs", json={"method": "lora", "name": "empty1", "config": {"data": "nothing"}})
    assert r.status_code == 422 and "is empty; put training images" in r.json()["errors"]
    assert not (tmp_path / "runs" / "empty1").exists()  # no job, no folder
    assert all(run["name"] != "empty1" for run in client.get("/sdtune/v1/runs").json())


def test_cross_origin_writes_are_refused(client):
    r = client.post("/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert client.get("/sdapi/v1/options", headers={"Origin": "http://evil.example"}).status_code == 200
    assert client.post("/sdapi/v1/interrupt", headers={"Origin": "http://testserver"}).status_code == 200


def test_basic_auth_guards_ui_and_api(world, tmp_path):
    c = make_client(world, tmp_path, auth="me:secret")
    assert c.get("/").status_code == 401 and c.get("/sdapi/v1/options").status_code == 401
    assert c.get("/sdapi/v1/options", auth=("me", "wrong")).status_code == 401
    assert c.get("/sdapi/v1/options", auth=("me", "secret")).status_code == 200
    assert c.get("/", auth=("me", "secret")).status_code == 200


def test_no_api_serves_the_ui_only(world, tmp_path):
    c = make_client(world, tmp_path, no_api=True)
    assert c.get("/sdapi/v1/options").status_code == 404
    assert c.get("/sdapi/v1/options", headers={"X-Sdtune-UI": "1"}).status_code == 200


def test_bodies_are_bounded(client):
    r = client.post("/sdapi/v1/png-info", content=b"{}", headers={"content-length": str(2**30),
                                                                    "content-type": "application/json"})
    assert r.status_code == 413


def test_cli_refuses_bad_options(tmp_path):
    from click.testing import CliRunner

    from sdtune.cli import _register, cli

    _register()
    r = CliRunner().invoke(cli, ["ui", "--auth", "nopassword"])
    assert r.exit_code != 0 and "USER:PASSWORD" in str(r.exception)
    r = CliRunner().invoke(cli, ["ui", "--lora-dir", str(tmp_path / "missing")])
    assert r.exit_code != 0


def test_a1111_data_dir_layout(world, tmp_path):
    from sdtune.server.folders import ModelFolders

    f = ModelFolders.from_options(data_dir=world["root"], lora_dir=tmp_path)
    assert f.lora == tmp_path  # a folder given on its own wins
    assert f.ckpt == world["root"] / "models/Stable-diffusion" and f.embeddings == world["root"] / "embeddings"
    assert f.hypernetwork == world["root"] / "models/hypernetworks" and f.outputs == world["root"] / "outputs"


# ------------------------------------------------------------------------------------------------------ sdtune API

def test_schema_is_the_train_config_schema(client):
    from sdtune.training.config import TrainConfig
    from sdtune.training.methods.lora import LoraOptions

    schema = client.get("/sdtune/v1/schema").json()
    assert {f["name"] for f in schema["fields"]} == {f.name for f in TrainConfig.fields() if f.metadata["cli"]}
    lora = {o["name"] for o in schema["methods"]["lora"]["options"]}
    assert {"rank", "alpha", "targets"} <= lora and lora <= {f for f in LoraOptions.__dataclass_fields__}
    assert schema["methods"]["ti"]["guidance"].startswith("Textual Inversion") and schema["methods"]["lora"]["presets"]


def test_toml_save_and_load_is_the_cli_config(client, tmp_path):
    import tomllib

    from sdtune.training.config import TrainConfig

    r = client.post("/sdtune/v1/config/toml", json={"method": "lora", "config": {"steps": 77, "data": "d",
                                                                                 "lora": {"rank": 8}}}).json()
    path = tmp_path / "run.toml"
    path.write_text(r["toml"])
    cfg = TrainConfig.from_toml(path)  # exactly the file `sdtune train --config` takes
    assert cfg.steps == 77 and cfg.options.rank == 8 and cfg.data == "d"
    back = client.post("/sdtune/v1/config/parse", json={"toml": r["toml"]}).json()
    assert back["method"] == "lora" and back["config"]["optim"]["steps"] == 77
    assert tomllib.loads(r["toml"])["lora"]["rank"] == 8


def test_dataset_listing_caption_edit_and_check(client, world):
    d = client.get("/sdtune/v1/datasets", params={"path": "stars"}).json()
    assert len(d["items"]) == 3 and d["items"][0]["caption"].endswith("star")
    img = client.get("/sdtune/v1/datasets/image", params={"path": "stars", "image": d["items"][0]["image"]})
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    r = client.put("/sdtune/v1/datasets/caption", params={"path": "stars"},
                   json={"path": d["items"][0]["image"], "caption": "a photo of sks star"})
    assert r.status_code == 200
    assert (world["data"] / d["items"][0]["image"]).with_suffix(".txt").read_text() == "a photo of sks star"
    report = client.post("/sdtune/v1/datasets/check", json={"path": "stars", "method": "ti"}).json()
    assert report["report"]["readable"] == 3 and report["text"]


def test_token_counts_per_chunk(client):
    assert client.get("/sdtune/v1/tokens", params={"prompt": "a red circle"}).json()["chunks"] == [3]
    long = client.get("/sdtune/v1/tokens", params={"prompt": " ".join(["circle"] * 80)}).json()["chunks"]
    assert len(long) == 2 and sum(long) == 80


def test_extra_network_cards(client):
    cards = client.get("/sdtune/v1/extra-networks").json()
    ink = cards["lora"][0]
    assert ink["tag"] == "<lora:ink:1>" and ink["family"] == "sd1" and ink["preview"]
    assert client.get(ink["preview"]).headers["content-type"] == "image/png"
    assert cards["hypernetwork"][0]["tag"] == "<hypernet:sketch:1>"
    assert [c["name"] for c in cards["embedding"]] == ["shiny"]


def wait_for(client, name, statuses, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.get(f"/sdtune/v1/runs/{name}").json()
        if run.get("status") in statuses:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {name} did not reach {statuses}: {run}")


def test_training_run_start_inspect_stop_resume_use(world, tmp_path):
    (tmp_path / "emb").mkdir()
    c = make_client(world, tmp_path, embeddings_dir=tmp_path / "emb")
    config = {"data": "stars", "steps": 40, "save_every": 4, "sample_every": 4, "sample_prompts": ["a red <s>"],
              "sample_steps": 2, "lr": "5e-3", "ti": {"token": "<s>", "init": "shape"}}
    r = c.post("/sdtune/v1/runs", json={"method": "ti", "name": "s1", "config": config})
    assert r.status_code == 200, r.text
    deadline = time.time() + 120
    while time.time() < deadline and len(c.get("/sdtune/v1/runs/s1").json().get("rows", [])) < 1:
        time.sleep(0.2)
    assert c.post("/sdtune/v1/runs/s1/stop").status_code == 200
    stopped = wait_for(c, "s1", ("interrupted", "done"))
    assert stopped["status"] == "interrupted" and stopped["losses"] and stopped["samples"]
    step = stopped["losses"][-1][0]
    assert 4 <= step < 40
    again = c.post("/sdtune/v1/runs", json={"method": "ti", "name": "s1", "config": config})
    assert again.status_code == 422 and "already exists" in again.json()["errors"]
    assert c.post("/sdtune/v1/runs/s1/resume").status_code == 200
    done = wait_for(c, "s1", ("done", "failed"))
    assert done["status"] == "done" and done["losses"][-1][0] == 40 and done["summary"]["final"] == "s.safetensors"
    assert [row["step"] for row in done["rows"]][-1] == 40
    sample = c.get("/sdtune/v1/runs/s1/file", params={"path": done["samples"][0]})
    assert sample.status_code == 200 and sample.content[:4] == b"\x89PNG"
    runs = c.get("/sdtune/v1/runs").json()
    assert [(x["name"], x["method"], x["status"]) for x in runs] == [("s1", "ti", "done")]
    used = c.post("/sdtune/v1/runs/s1/use", params={"step": 40}).json()
    assert used["prompt"] == "s1-40" and (tmp_path / "emb" / "s1-40.safetensors").is_file()
    names = [e["name"] for e in c.get("/sdtune/v1/extra-networks").json()["embedding"]]
    assert "s1-40" in names  # usable by name in Generate without a restart
    r = c.post("/sdapi/v1/txt2img", json={**QUICK, "prompt": "a s1-40 on a white background"})
    assert r.status_code == 200
    missing = c.post("/sdtune/v1/runs/s1/use", params={"step": 3})
    assert missing.status_code == 422 and "no checkpoint file of step 3" in missing.json()["errors"]


def test_a_run_that_fails_while_preparing_says_why(world, tmp_path):
    # an image that does not decode passes the listing made before queueing and fails the job's own checks
    (world["root"] / "datasets" / "garbled").mkdir(exist_ok=True)
    (world["root"] / "datasets" / "garbled" / "x.png").write_bytes(b"not an image at all")
    c = make_client(world, tmp_path)
    r = c.post("/sdtune/v1/runs", json={"method": "lora", "name": "e", "config": {"data": "garbled"}})
    assert r.status_code == 200
    run = wait_for(c, "e", ("failed",))
    assert run["message"].startswith("error: ") and "unreadable image" in run["message"]


def test_a_bad_training_config_is_refused_before_it_queues(client):
    r = client.post("/sdtune/v1/runs", json={"method": "ti", "name": "bad", "config": {"steps": 0, "data": "stars"}})
    assert r.status_code == 422 and "steps" in r.json()["errors"]
    r = client.post("/sdtune/v1/runs", json={"method": "nope", "name": "bad", "config": {}})
    assert r.status_code == 422 and "unknown training method" in r.json()["errors"]
    r = client.post("/sdtune/v1/runs", json={"method": "ti", "name": "bad", "config": {"stepz": 3}})
    assert r.status_code == 422 and "did you mean 'steps'" in r.json()["errors"]


def test_server_shutdown_stops_a_run_with_its_state_saved(world, tmp_path):
    from sdtune.training.checkpoint import StateStore

    c = make_client(world, tmp_path)
    with c:  # the context runs the app's lifespan: leaving it is the server shutting down
        config = {"data": "stars", "steps": 500, "save_every": 100, "ti": {"token": "<q>", "init": "shape"}}
        assert c.post("/sdtune/v1/runs", json={"method": "ti", "name": "q", "config": config}).status_code == 200
        deadline = time.time() + 120
        while time.time() < deadline and len(c.get("/sdtune/v1/runs/q").json().get("losses", [])) < 3:
            time.sleep(0.1)
    state = StateStore(tmp_path / "runs" / "q" / "state").load(None)
    assert 3 <= state.step < 500  # stopped early, the exact step saved: `--resume` continues from it


def test_a_finished_run_is_done_before_and_after_a_restart(world, tmp_path):
    # one word for one state: a run that wrote its final file reads "done" from a server that did not run it (as
    # from the one that did, whose job said "done"), in the runs list and on the run page
    folder = tmp_path / "runs" / "old"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": "lora"}))
    (folder / "summary.json").write_text(json.dumps({"step": 10, "steps": 10, "final": "old.safetensors"}))
    c = make_client(world, tmp_path)
    assert [(r["name"], r["status"]) for r in c.get("/sdtune/v1/runs").json()] == [("old", "done")]
    assert c.get("/sdtune/v1/runs/old").json()["status"] == "done"


def test_an_interrupted_run_reads_interrupted_after_a_restart_too(world, tmp_path):
    # its job said "interrupted"; a server that did not run it reads the log's `end` record; no `end` (a killed
    # run) stays "stopped", a diverged one reads "failed" as its job did
    for name, end in (("stopped1", {"event": "end", "step": 3, "stopped": "interrupted", "final": None}),
                      ("diverged1", {"event": "end", "step": 3, "stopped": "diverged", "final": None}),
                      ("killed1", {"event": "step", "step": 3, "loss": 0.1})):
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"method": "lora"}))
        (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in ({"event": "start", "step": 0}, end)) + "\n")
    c = make_client(world, tmp_path)
    listed = {r["name"]: r["status"] for r in c.get("/sdtune/v1/runs").json()}
    assert listed == {"stopped1": "interrupted", "diverged1": "failed", "killed1": "stopped"}
    assert c.get("/sdtune/v1/runs/stopped1").json()["status"] == "interrupted"


def test_a_started_run_is_listed_with_its_method_before_its_folder_is_written(world, tmp_path):
    # a queued run (another job holds the queue) has no run folder yet: the runs list and the run page show it,
    # with its method, at once
    import threading

    from sdtune.server.jobs import Job

    c = make_client(world, tmp_path)
    release = threading.Event()
    blocker = c.app.state.sdtune.jobs.submit(Job(kind="test", title="hold the queue", run=lambda job: release.wait(60)))
    try:
        r = c.post("/sdtune/v1/runs", json={"method": "lora", "name": "waiting", "config": {"data": "stars"}})
        assert r.status_code == 200, r.text
        assert not (tmp_path / "runs" / "waiting" / "config.json").exists()
        runs = c.get("/sdtune/v1/runs").json()
        assert [(x["name"], x["method"], x["status"]) for x in runs] == [("waiting", "lora", "queued")]
        run = c.get("/sdtune/v1/runs/waiting")
        assert run.status_code == 200, run.text
        assert (run.json()["method"], run.json()["status"]) == ("lora", "queued")
        assert c.post("/sdtune/v1/runs/waiting/stop").status_code == 200
    finally:
        release.set()
    blocker.future.result(timeout=60)
    assert wait_for(c, "waiting", ("interrupted",), timeout=60)["method"] == "lora"
