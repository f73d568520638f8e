"""The web UI in a real browser (headless Chromium driven by Selenium, Debian's chromium + chromium-driver):
generate and see the image with its infotext, click a LoRA card, PNG Info round trip, and a Textual Inversion run
started, watched (loss chart, samples), stopped, resumed and finished from the UI.

Every page is saved as a screenshot under the test's temp folder; with SDTUNE_SCREENSHOTS=DIR they are also copied
there (docs/images/ holds the ones docs/ui.md shows). Without Chromium these tests are skipped, except where
SDTUNE_REQUIRE_BROWSER=1 (CI sets it and installs Chromium), where its absence is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("SDTUNE_REQUIRE_BROWSER") == "1":
        raise RuntimeError("SDTUNE_REQUIRE_BROWSER=1 but chromium/chromedriver are not installed "
                           "(apt-get install chromium chromium-driver)")
    pytest.skip("browser tests need chromium and chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import random_network
    from sdtune.cli.ui import build_settings
    from sdtune.models import load_model
    from sdtune.server.app import create_app
    from sdtune.toy.testing import write_toy_dataset

    root = tmp_path_factory.mktemp("ui")
    (root / "loras").mkdir()
    save_lora(random_network(load_model("tiny").pipe, seed=1, scale=0.5), root / "loras" / "ink.safetensors")
    write_toy_dataset(root / "datasets" / "stars", 3, size=64, shapes=("star",), caption="a {colour} star")
    (root / "embeddings").mkdir()
    settings = build_settings(listen=False, auth=None, no_api=False, datasets=(root / "datasets",),
                              lora_dir=root / "loras", embeddings_dir=root / "embeddings", outputs=root / "outputs",
                              runs=root / "runs")
    port = _free_port()
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}/", "root": root, "app": app}
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    copy_to = os.environ.get("SDTUNE_SCREENSHOTS")

    def save(driver, name):
        path = folder / f"{name}.png"
        driver.save_screenshot(str(path))
        assert path.stat().st_size > 1000
        if copy_to:
            Path(copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(copy_to) / path.name)
        return path

    return save


def wait(driver, condition, timeout=120):
    # lists the page re-renders (the runs list) can replace an element between finding it and reading it
    from selenium.common.exceptions import StaleElementReferenceException

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def open_page(browser, server):
    browser.get(server["url"])
    wait(browser, lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 5, 30)


def fill_train_form(browser, server, method, run, dataset=None):
    """The Train page with `method` chosen, the run named `run` and (optionally) the dataset folder typed in."""
    open_page(browser, server)
    browser.find_element(By.ID, "tab-train").click()
    Select(browser.find_element(By.ID, "train-method")).select_by_value(method)
    name = browser.find_element(By.ID, "run-name")
    name.clear()
    name.send_keys(run)
    if dataset is not None:
        browser.find_element(By.ID, "dataset-path").send_keys(dataset)


def test_generate_shows_the_image_and_its_infotext(browser, server, shots):
    open_page(browser, server)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("a blue square on a black background")
    wait(browser, lambda d: d.find_element(By.ID, "prompt-tokens").text == "7/75", 10)
    browser.find_element(By.ID, "steps").clear()
    browser.find_element(By.ID, "steps").send_keys("8")
    browser.find_element(By.ID, "seed").clear()
    browser.find_element(By.ID, "seed").send_keys("42")
    browser.find_element(By.ID, "generate").click()
    wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "#gallery img")))
    info = wait(browser, lambda d: d.find_element(By.ID, "infotext").text)
    assert info.startswith("a blue square on a black background") and "Seed: 42" in info and "Steps: 8" in info
    assert browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src").startswith("data:image/png")
    saved = list((server["root"] / "outputs").rglob("*-42.png"))
    assert len(saved) == 1  # the UI saves like A1111
    shots(browser, "generate")


def test_clicking_a_lora_card_inserts_its_tag(browser, server, shots):
    open_page(browser, server)
    card = wait(browser, EC.element_to_be_clickable((By.CSS_SELECTOR, '.en-card[data-name="ink"]')), 30)
    browser.find_element(By.ID, "prompt").clear()
    card.click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "<lora:ink:1>"
    card.click()  # a second click takes it out again, as in A1111
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == ""
    shots(browser, "extra-networks")


def test_png_info_round_trip(browser, server, shots):
    image = sorted((server["root"] / "outputs").rglob("*.png"))[0]
    open_page(browser, server)
    browser.find_element(By.ID, "tab-pnginfo").click()
    browser.find_element(By.ID, "pnginfo-file").send_keys(str(image))
    text = wait(browser, lambda d: d.find_element(By.ID, "pnginfo-text").text, 30)
    assert "Seed: 42" in text
    shots(browser, "pnginfo")
    browser.execute_script('document.getElementById("width").value = "8"; document.getElementById("height").value = "8";')
    wait(browser, EC.element_to_be_clickable((By.ID, "pnginfo-send"))).click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a blue square on a black background"
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "42"
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "8"
    w, h = Image.open(image).size  # the size comes back too (A1111's Size-1 / Size-2)
    assert (browser.find_element(By.ID, "width").get_attribute("value"),
            browser.find_element(By.ID, "height").get_attribute("value")) == (str(w), str(h))


def test_a_textual_inversion_run_from_the_train_page(browser, server, shots):
    open_page(browser, server)
    browser.find_element(By.ID, "tab-train").click()
    Select(browser.find_element(By.ID, "train-method")).select_by_value("ti")
    assert "Textual Inversion" in browser.find_element(By.ID, "method-guidance").text
    name = browser.find_element(By.ID, "run-name")
    name.clear()
    name.send_keys("ui-star")
    browser.find_element(By.ID, "dataset-path").send_keys("stars")
    browser.find_element(By.ID, "dataset-load").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#dataset-items img")) == 3, 30)

    def field(scope, key, value):
        el = browser.find_element(By.ID, f"f-{scope}-{key}")
        el.clear()
        el.send_keys(value)

    field("method", "token", "<ustar>")
    field("method", "init", "shape")
    for key, value in (("steps", "60"), ("save_every", "5"), ("sample_every", "5"), ("sample_prompts", "a red <ustar>"),
                       ("sample_steps", "2"), ("lr", "5e-3")):
        field("config", key, value)
    shots(browser, "train")
    browser.find_element(By.ID, "train-start").click()
    wait(browser, lambda d: d.find_element(By.ID, "run-title").text.startswith("ui-star"), 30)
    wait(browser, lambda d: int(d.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0) > 0)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#run-samples img"))
    browser.find_element(By.ID, "run-stop").click()
    wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "interrupted")
    points = int(browser.find_element(By.ID, "loss-chart").get_attribute("data-points"))
    assert 0 < points < 60
    wait(browser, EC.element_to_be_clickable((By.ID, "run-resume"))).click()
    wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "done", 240)
    wait(browser, lambda d: int(d.find_element(By.ID, "loss-chart").get_attribute("data-points")) == 60, 10)
    assert browser.find_elements(By.CSS_SELECTOR, "#run-rows tr")  # the checkpoint table
    assert (server["root"] / "runs" / "ui-star" / "ustar.safetensors").is_file()
    shots(browser, "run")
    browser.find_element(By.CSS_SELECTOR, 'button.use[data-step="60"]').click()
    wait(browser, lambda d: "ui-star-60" in d.find_element(By.ID, "prompt").get_attribute("value"), 30)
    assert browser.find_element(By.ID, "page-generate").is_displayed()


def test_the_processes_field_goes_with_the_run(browser, server):
    # the Train page's Processes field is bounded by the schema and sent with the run (the server refuses 9 on a
    # CPU-only machine, before anything is queued)
    open_page(browser, server)
    browser.find_element(By.ID, "tab-train").click()
    Select(browser.find_element(By.ID, "train-method")).select_by_value("lora")
    processes = browser.find_element(By.ID, "train-processes")
    wait(browser, lambda d: processes.get_attribute("max") not in (None, "", "1"), 30)
    assert processes.get_attribute("value") == "1" and int(processes.get_attribute("max")) >= 2
    name = browser.find_element(By.ID, "run-name")
    name.clear()
    name.send_keys("ui-many")
    browser.find_element(By.ID, "dataset-path").send_keys("stars")
    processes.clear()
    processes.send_keys("9")
    browser.find_element(By.ID, "train-start").click()
    wait(browser, lambda d: "processes 9" in d.find_element(By.ID, "train-error").text, 30)
    assert not (server["root"] / "runs" / "ui-many").exists()


def test_processes_0_is_refused_not_run_on_one(browser, server):
    # 0 (or any bad count) is the server's one-line error, not silently 1 process
    fill_train_form(browser, server, "lora", "ui-zero", "stars")
    processes = browser.find_element(By.ID, "train-processes")
    processes.clear()
    processes.send_keys("0")
    browser.find_element(By.ID, "train-start").click()
    wait(browser, lambda d: "processes 0" in d.find_element(By.ID, "train-error").text, 30)
    assert browser.find_element(By.ID, "page-train").is_displayed()
    assert not (server["root"] / "runs" / "ui-zero").exists()


def test_the_recipe_box_looks_like_the_form_sections(browser, server):
    open_page(browser, server)
    browser.find_element(By.ID, "tab-train").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#train-form fieldset"), 30)

    def style(selector, prop):
        return browser.execute_script("return getComputedStyle(document.querySelector(arguments[0]))"
                                      "[arguments[1]]", selector, prop)

    for prop in ("border-top-color", "border-top-width", "border-top-style", "border-top-left-radius"):
        assert style("#recipe-box", prop) == style("#train-form fieldset", prop), prop
    assert style("#recipe-box legend", "color") == style("#train-form legend", "color")


def test_a_failed_run_shows_its_error_without_breaking_the_page(browser, server):
    # a long one-line error (here: an image that does not decode) wraps; the runs list keeps its width, nothing
    # scrolls sideways
    (server["root"] / "datasets" / "nothing").mkdir(exist_ok=True)
    (server["root"] / "datasets" / "nothing" / "x.png").write_bytes(b"not an image at all")
    fill_train_form(browser, server, "lora", "ui-empty", "nothing")
    browser.find_element(By.ID, "train-start").click()
    wait(browser, lambda d: d.find_element(By.ID, "run-status").text == "failed", 60)
    assert "unreadable image" in browser.find_element(By.ID, "run-message").text
    assert browser.execute_script("return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    assert browser.find_element(By.ID, "runs-list").size["width"] == 260


def test_the_wrong_lora_recipe_from_the_train_page(browser, server):
    # bad settings come back as the server's one line; a started recipe is followed and Stop ends it resumable
    open_page(browser, server)
    browser.find_element(By.ID, "tab-train").click()
    name = browser.find_element(By.ID, "run-name")
    name.clear()
    name.send_keys("ui-wrong")
    images = browser.find_element(By.ID, "recipe-images")
    images.clear()
    images.send_keys("0")
    browser.find_element(By.ID, "recipe-start").click()
    status = browser.find_element(By.ID, "recipe-status")
    wait(browser, lambda d: "--images 0 is out of range" in status.text, 30)
    images.clear()
    images.send_keys("40")
    browser.find_element(By.ID, "recipe-start").click()
    wait(browser, lambda d: list((server["root"] / "runs" / "ui-wrong" / "bad_images").glob("*.png")), 120)
    browser.find_element(By.ID, "recipe-stop").click()
    wait(browser, lambda d: status.get_attribute("data-status") == "interrupted", 120)
    assert status.text.startswith("ui-wrong: interrupted")


def test_the_recipe_status_shows_once_there_is_one_with_the_comparison_grid(browser, server, shots):
    # no empty grey bar before a recipe ran; a finished recipe shows its comparison grid image, not only numbers
    import json

    from PIL import Image

    folder = server["root"] / "runs" / "ui-grid"
    (folder / "compare").mkdir(parents=True)
    (folder / "recipe.json").write_text(json.dumps({"trigger": "wrong"}))
    (folder / "wrong.safetensors").write_bytes(b"")
    (folder / "compare" / "report.json").write_text(json.dumps({"variants": {"base": {"figures": {"agreement": 0.5}}}}))
    Image.new("RGB", (96, 32), "orange").save(folder / "compare" / "grid.png")
    open_page(browser, server)
    browser.find_element(By.ID, "tab-train").click()
    status = browser.find_element(By.ID, "recipe-status")
    assert not status.is_displayed()
    browser.execute_script("followRecipe('ui-grid')")
    wait(browser, lambda d: status.text.startswith("ui-grid: done"), 30)
    grid = browser.find_element(By.ID, "recipe-grid")
    wait(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", grid) == 96, 30)
    assert grid.is_displayed() and "base: agreement 0.500" in status.text
    browser.execute_script("arguments[0].scrollIntoView()", grid)
    shots(browser, "recipe-grid")


def test_a_started_run_is_in_the_runs_list_at_once_and_the_list_follows_it(browser, server, shots):
    # queued behind another job, the run has no folder yet: the list shows it with its method, the run page names
    # its method, and the list follows the run when it ends (stopped here)
    import threading

    from sdtune.server.jobs import Job

    release = threading.Event()
    blocker = server["app"].state.sdtune.jobs.submit(Job(kind="test", title="hold the queue",
                                                         run=lambda job: release.wait(60)))
    try:
        fill_train_form(browser, server, "lora", "ui-queued", "stars")
        browser.find_element(By.ID, "train-start").click()
        item = '#runs-list li[data-run="ui-queued"]'
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, item), 30)
        wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, item).text == "ui-queued (lora) queued", 30)
        wait(browser, lambda d: d.find_element(By.ID, "run-title").text == "ui-queued (lora)", 30)
        shots(browser, "run-queued")
        browser.find_element(By.ID, "run-stop").click()
    finally:
        release.set()
    blocker.future.result(timeout=60)
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, item).text == "ui-queued (lora) interrupted", 30)


def test_samples_have_a_step_caption_and_processes_its_own_tooltip(browser, server, shots):
    import json

    from PIL import Image

    folder = server["root"] / "runs" / "ui-samples"
    (folder / "samples").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": "ti"}))
    for step in (5, 10):
        Image.new("RGB", (64, 64), "teal").save(folder / "samples" / f"ui-samples-{step:06d}.png")
    open_page(browser, server)
    browser.find_element(By.ID, "tab-train").click()
    help_text = wait(browser, lambda d: d.find_element(By.ID, "processes-label").get_attribute("title"), 30)
    assert browser.find_element(By.ID, "train-processes").get_attribute("title") == help_text
    browser.find_element(By.ID, "tab-runs").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#runs-list li[data-run="ui-samples"]'), 30)[0].click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#run-samples figcaption")) == 2, 30)
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#run-samples figcaption")]
    assert captions == ["step 5", "step 10"]
    shots(browser, "run-samples")


def test_a_run_started_elsewhere_appears_while_the_runs_page_is_open(browser, server):
    # the CLI (or the API, or another browser) writes OUT/config.json when it starts: the open list picks it up
    # without a reload (before, only reopening the page showed it)
    import json

    open_page(browser, server)
    browser.find_element(By.ID, "tab-runs").click()
    time.sleep(1)  # the page's own first listing, before the run exists
    folder = server["root"] / "runs" / "from-cli"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": "dreambooth"}))
    item = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#runs-list li[data-run="from-cli"]'), 30)
    assert item[0].text.startswith("from-cli (dreambooth)")
