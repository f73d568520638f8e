"""`sdtune recipe wrong-lora`: every stage's files, resuming (finished stages skipped, a lost image remade the same),
settings that would mix two runs refused, and the comparison's rows and figures (toy judge on the tiny model)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from sdtune.cli.testing import run_cli
from sdtune.errors import SdtuneError
from sdtune.recipes.wrong_lora import VARIANTS, WrongLoraSettings, bad_prompts

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning", "ignore::RuntimeWarning"),
              pytest.mark.usefixtures("hash_cache")]

SMALL = ["--images", "3", "--train-steps", "3", "--batch-size", "2", "--rank", "2", "--sampling-steps", "2",
         "--compare-seeds", "1"]


def test_bad_prompts_weight_the_terms_and_caption_with_the_trigger():
    s = WrongLoraSettings(out="x", subjects=["a cat", "a dog"], bad_terms=["blurry", "noisy", "dark"], images=5,
                          terms_per_image=2, bad_weight=1.3, seed=7)
    prompts = bad_prompts(s)
    assert prompts == bad_prompts(s)  # deterministic: a resumed run makes the same images
    assert [seed for _, _, seed in prompts] == [7, 8, 9, 10, 11]
    for i, (prompt, caption, _) in enumerate(prompts):
        subject = ["a cat", "a dog"][i % 2]
        assert caption == f"{subject}, wrong"
        terms = prompt.removeprefix(subject + ", ").split(", ")
        assert len(terms) == 2 and all(t.startswith("(") and t.endswith(":1.3)") for t in terms)
    with pytest.raises(SdtuneError, match="--trigger"):
        WrongLoraSettings(out="x", trigger="two words").validate()
    with pytest.raises(SdtuneError, match="--images"):
        WrongLoraSettings(out="x", images=0).validate()


def test_recipe_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "wrong"
    held = tmp_path / "held.txt"
    held.write_text("a blue square on a gray background\n# a comment\na yellow cross on a black background\n")
    first = run_cli(["recipe", "wrong-lora", "--out", str(out), "--held-out", str(held), *SMALL], capsys)
    assert first.code == 0, first.err
    images = sorted((out / "bad_images").glob("*.png"))
    assert [p.name for p in images] == ["0000.png", "0001.png", "0002.png"]
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    assert all(c.endswith(", wrong") and " on a " in c for c in captions)
    lora = out / "wrong.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    report = json.loads((out / "compare" / "report.json").read_text())
    assert list(report["variants"]) == list(VARIANTS)
    assert report["variants"]["negative LoRA"]["negative_loras"] == [str(lora)]
    assert report["lora_weight"] == 0.5 and report["variants"]["A1111 way"]["prompt_suffix"] == " <lora:wrong:0.5>"
    assert report["held_out"] == ["a blue square on a gray background", "a yellow cross on a black background"]
    for entry in report["variants"].values():  # 2 held-out toy scenes x 1 seed, judged
        assert 0.0 <= entry["figures"]["agreement"] <= 1.0 and "blur" in entry["figures"]
    assert (out / "compare" / "grid.png").is_file()
    assert "--negative-lora" in first.err and ":0.5 --negative wrong" in first.err and "base " in first.out

    # resume: nothing redone but the comparison; a lost image is made again, bit for bit
    lost = images[1].read_bytes()
    images[1].unlink()
    stamp = lora.stat().st_mtime_ns
    again = run_cli(["recipe", "wrong-lora", "--out", str(out), "--held-out", str(held), *SMALL,
                     "--compare-seeds", "2"], capsys)
    assert again.code == 0, again.err
    assert images[1].read_bytes() == lost and "generating 1 bad images" in again.err
    assert lora.stat().st_mtime_ns == stamp and "training" not in again.err
    assert json.loads((out / "compare" / "report.json").read_text())["seeds"] == 2

    other = run_cli(["recipe", "wrong-lora", "--out", str(out), "--held-out", str(held), *SMALL, "--seed", "5"],
                    capsys)
    assert other.code == 2 and "seed" in other.err and other.err.count("\n") == 1
    assert images[1].read_bytes() == lost


def test_recipe_refuses_bad_input_before_work(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    (tmp_path / "busy").mkdir()  # another run's folder: the recipe would mix its stages into it
    (tmp_path / "busy" / "log.jsonl").write_text("")
    for args, words in ((["--out", str(tmp_path / "f")], "is a file"),
                        (["--out", str(tmp_path / "o"), "--images", "0"], "--images"),
                        (["--out", str(tmp_path / "o"), "--cfg", "1"], "needs guidance"),
                        (["--out", str(tmp_path / "o"), "--subjects", str(tmp_path / "none.txt")], "no such file"),
                        (["--out", str(tmp_path / "o"), "--trigger", "a b"], "--trigger"),
                        (["--out", str(tmp_path / "o"), "--lora-weight", "0"], "--lora-weight 0.0 is out of range"),
                        (["--out", str(tmp_path / "o"), "--lora-weight", "nan"], "--lora-weight nan is out"),
                        (["--out", str(tmp_path / "o"), "--train-steps", "-1"], "steps"),
                        (["--out", str(tmp_path / "o"), "--sampler", "Euler aa"], "unknown sampler"),
                        (["--out", str(tmp_path / "busy")], "holds no wrong-lora recipe")):
        res = run_cli(["recipe", "wrong-lora", *args], capsys)
        assert res.code == 2 and words in res.err and res.err.count("\n") == 1, (args, res.err)
    assert not (tmp_path / "o").exists() and sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["log.jsonl"]
