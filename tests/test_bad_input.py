"""Bad input ends in one line `error: ...` (exit code 2) before anything is loaded or written: sizes and counts
beyond their bounds, clip skip beyond the text encoder, text that is not valid UTF-8, misleading file messages,
toy dataset options, safetensors headers nested too deeply, and training names that are not plain file names.

Most cases fail before any model is loaded; the few that need one use the bundled tiny model."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtune.cli.testing import run_cli
from sdtune.errors import SdtuneError
from sdtune.generate import GenerationParams

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("hash_cache")]

BAD_UTF8 = b"a red \xff\xfe circle".decode("utf-8", "surrogateescape")  # what Python makes of such an argv


def one_error_line(code: int, err: str, *words: str) -> str:
    """Exit code 2 and exactly one line on stderr, `error: ...` holding every word, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def png_with(path: Path, infotext: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", infotext)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def deep_safetensors(path: Path, depth: int) -> Path:
    """A file with one valid 4-byte tensor whose header's metadata value nests `depth` lists."""
    header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": '
              + "[" * depth + "]" * depth + "}}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    return path


# -- 1. upper bounds of sizes and counts ------------------------------------------------------------------------

@pytest.mark.parametrize("changes,words", [
    (dict(steps=100_000_000), ["steps 100000000", "maximum 1000"]),
    (dict(steps=1001), ["steps 1001", "maximum 1000"]),
    (dict(width=100_000), ["width 100000", "maximum 4096"]),
    (dict(height=4104), ["height 4104", "maximum 4096"]),
    (dict(batch_size=1_000_000), ["batch size 1000000", "maximum 64"]),
    (dict(batch_count=1001), ["batch count 1001", "maximum 1000"]),
    (dict(clip_skip=13), ["clip skip 13", "maximum 12"]),
])
def test_params_upper_bounds(changes, words):
    with pytest.raises(SdtuneError) as e:
        GenerationParams(prompt="x", **changes).validate()
    for word in words:
        assert word in str(e.value)


def test_params_at_the_bounds_are_accepted():
    from sdtune.generate.params import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_CLIP_SKIP, MAX_SIDE, MAX_STEPS

    GenerationParams(prompt="x", steps=MAX_STEPS, width=MAX_SIDE, height=MAX_SIDE, batch_size=MAX_BATCH_SIZE,
                     batch_count=MAX_BATCH_COUNT, clip_skip=MAX_CLIP_SKIP, seed=0).validate()


def test_http_api_uses_the_same_bounds():
    from sdtune.generate import params
    from sdtune.server import a1111_models

    assert (a1111_models.MAX_STEPS, a1111_models.MAX_SIDE, a1111_models.MAX_BATCH_SIZE) == \
        (params.MAX_STEPS, params.MAX_SIDE, params.MAX_BATCH_SIZE)
    fields = a1111_models.Txt2ImgRequest.model_fields
    limits = {name: [m.le for m in fields[name].metadata if getattr(m, "le", None) is not None]
              for name in ("steps", "width", "height", "batch_size", "n_iter")}
    assert limits == {"steps": [params.MAX_STEPS], "width": [params.MAX_SIDE], "height": [params.MAX_SIDE],
                      "batch_size": [params.MAX_BATCH_SIZE], "n_iter": [a1111_models.MAX_N_ITER]}
    assert a1111_models.MAX_N_ITER <= params.MAX_BATCH_COUNT


@pytest.mark.parametrize("extra,words", [
    (["--width", "100000", "--height", "100000"], ["width 100000", "maximum 4096"]),
    (["--batch-size", "1000000"], ["batch size 1000000", "maximum 64"]),
    (["--steps", "100000000"], ["steps 100000000", "maximum 1000"]),
    (["--count", "5000"], ["batch count 5000", "maximum 1000"]),
    (["--clip-skip", "100"], ["clip skip 100", "maximum 12"]),
])
def test_cli_generate_bounds(tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", "x", *extra, "--out", str(out)], capsys)
    one_error_line(code, err, *words)
    assert not out.exists()


@pytest.mark.parametrize("fields,words", [
    ("Steps: 999999999, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64", ["steps 999999999", "maximum 1000"]),
    ("Steps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 100000x100000", ["width 100000", "maximum 4096"]),
    ("Steps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Batch size: 1000000, Batch pos: 0",
     ["batch size 1000000", "maximum 64"]),
    ("Steps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Clip skip: 100", ["clip skip 100"]),
])
def test_cli_from_png_goes_through_the_same_bounds(tmp_path, capsys, fields, words):
    png = png_with(tmp_path / "in.png", f"a red circle\n{fields}, Model: tiny")
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", "--from-png", str(png), "--model", "tiny", "--out", str(out)], capsys)
    one_error_line(code, err, *words)
    assert not out.exists()


# -- 2. clip skip beyond the text encoder -----------------------------------------------------------------------

def test_text_conditioner_refuses_clip_skip_beyond_its_layers():
    from types import SimpleNamespace

    from sdtune.prompts.encoder import TextConditioner

    te = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=3, hidden_size=32))
    pipe = SimpleNamespace(text_encoder=te, tokenizer=None)
    TextConditioner(pipe, clip_skip=3)
    with pytest.raises(SdtuneError, match=r"clip skip 5 .*\(3\); use 1\.\.3"):
        TextConditioner(pipe, clip_skip=5)


def test_cli_clip_skip_beyond_the_models_layers(tmp_path, capsys):
    out = tmp_path / "out"  # the bundled tiny model's text encoder has 3 layers
    code, _, err = run_cli(["generate", "x", "--clip-skip", "5", "--steps", "1", "--width", "32", "--height", "32",
                            "--device", "cpu", "--out", str(out)], capsys)
    one_error_line(code, err, "clip skip 5", "layers (3)")
    assert not list(out.glob("*.png")) if out.exists() else True


# -- 3. text that is not valid UTF-8 ----------------------------------------------------------------------------

@pytest.mark.parametrize("changes,words", [
    (dict(prompt=BAD_UTF8), ["the prompt is not valid text", "position 6"]),
    (dict(prompt="ok", negative_prompt="\udcff"), ["the negative prompt is not valid text", "position 0"]),
])
def test_params_refuse_lone_surrogates(changes, words):
    with pytest.raises(SdtuneError) as e:
        GenerationParams(**changes).validate()
    for word in words:
        assert word in str(e.value)
    str(e.value).encode("utf-8")  # the message itself can be printed


@pytest.mark.parametrize("text", ["\udcff", BAD_UTF8, "a (red:1.2) \ud800 circle"])
def test_explain_prompt_refuses_lone_surrogates(text):
    from sdtune.prompts.explain import explain_prompt

    with pytest.raises(SdtuneError, match="not valid text .*unpaired surrogate / invalid UTF-8") as e:
        explain_prompt(text)
    assert "\n" not in str(e.value)
    str(e.value).encode("utf-8")


@pytest.mark.parametrize("extra", [[BAD_UTF8], ["x", "--negative", BAD_UTF8]])
def test_cli_generate_invalid_utf8(tmp_path, capsys, extra):
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", *extra, "--out", str(out)], capsys)
    one_error_line(code, err, "is not valid text", "invalid UTF-8")
    assert not out.exists()


# -- 4. messages that named the wrong problem -------------------------------------------------------------------

def test_parse_file_weight(tmp_path):
    from sdtune.adapters.args import parse_file_weight

    f = tmp_path / "style.safetensors"
    f.write_bytes(b"x")
    assert parse_file_weight(f"{f}:0.5", "--lora") == (str(f), 0.5)
    with pytest.raises(SdtuneError, match=r"--lora .*: the weight 'abc' is not a number"):
        parse_file_weight(f"{f}:abc", "--lora")
    with pytest.raises(SdtuneError, match=r"the strength '' is not a number"):
        parse_file_weight(f"{f}:", "--hypernetwork", "strength")
    colon = tmp_path / "a:b.safetensors"  # a file whose name has a colon is still a file
    colon.write_bytes(b"x")
    assert parse_file_weight(str(colon), "--lora") == (str(colon), 1.0)
    missing = str(tmp_path / "missing.safetensors:abc")  # neither exists: the caller says "no such file"
    assert parse_file_weight(missing, "--lora") == (missing, 1.0)


@pytest.mark.parametrize("option,words", [
    ("--lora", ["the weight 'abc' is not a number"]),
    ("--hypernetwork", ["the strength 'abc' is not a number"]),
])
def test_cli_wrong_weight_is_not_no_such_file(tmp_path, capsys, option, words):
    f = tmp_path / "net.safetensors"
    f.write_bytes(b"x")
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", "x", option, f"{f}:abc", "--out", str(out)], capsys)
    line = one_error_line(code, err, *words)
    assert "no such file" not in line
    assert not out.exists()


def test_cli_from_png_folder(tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", "--from-png", str(folder), "--out", str(out)], capsys)
    line = one_error_line(code, err, "is a folder")
    assert "no such file" not in line
    assert not out.exists()


# -- 5. sdtune toy dataset --------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,words", [
    (["--out", "FILE"], ["is a file, not a folder"]),
    (["--out", "FILE/sub"], ["cannot create the folder"]),
    (["--out", "NEW", "--caption", "{nope}"], ["unknown field {nope}"]),
    (["--out", "NEW", "--caption", "a {"], ["is not a valid template"]),
    (["--out", "NEW", "--caption", "a }"], ["is not a valid template"]),
    (["--out", "NEW", "--caption", "{0}"], ["is not a valid template"]),
    (["--out", "NEW", "--caption", "{shape.x}"], ["is not a valid template"]),
])
def test_cli_toy_dataset_bad_options(tmp_path, capsys, extra, words):
    (tmp_path / "file").write_text("x")
    new = tmp_path / "new"
    extra = [a.replace("FILE", str(tmp_path / "file")).replace("NEW", str(new)) for a in extra]
    code, _, err = run_cli(["toy", "dataset", "-n", "2", *extra], capsys)
    one_error_line(code, err, *words)
    assert not new.exists() and (tmp_path / "file").read_text() == "x"


def test_cli_toy_dataset_caption_with_fields_still_works(tmp_path, capsys):
    out = tmp_path / "ds"
    code, _, err = run_cli(["toy", "dataset", "-n", "2", "--out", str(out), "--caption", "sks {colour} {{x}}"],
                           capsys)
    assert code == 0, err
    assert (out / "0000.txt").read_text().startswith("sks ") and "{x}" in (out / "0000.txt").read_text()


# -- 6. safetensors headers nested too deeply -------------------------------------------------------------------

@pytest.mark.parametrize("depth", [100_000, 65])
def test_read_header_refuses_deep_nesting(tmp_path, depth):
    from sdtune.formats.safe_io import read_safetensors_header

    path = deep_safetensors(tmp_path / "deep.safetensors", depth)
    with pytest.raises(SdtuneError, match="nested more than 64 levels") as e:
        read_safetensors_header(path)
    assert "\n" not in str(e.value)


def test_read_header_accepts_moderate_nesting(tmp_path):
    from sdtune.formats.safe_io import read_safetensors_header

    tensors, metadata = read_safetensors_header(deep_safetensors(tmp_path / "ok.safetensors", 60))
    assert list(tensors) == ["w"] and metadata["a"].startswith("[[[")


@pytest.mark.parametrize("argv", [
    ["info", "DEEP"],
    ["generate", "x", "--lora", "DEEP", "--out", "OUT"],
    ["generate", "x", "--model", "DEEP", "--out", "OUT"],
    ["convert", "DEEP", "--to", "kohya", "--out", "OUT.safetensors"],
])
def test_cli_deep_safetensors_header(tmp_path, capsys, argv):
    deep = deep_safetensors(tmp_path / "deep.safetensors", 100_000)
    argv = [a.replace("DEEP", str(deep)).replace("OUT", str(tmp_path / "out")) for a in argv]
    code, _, err = run_cli(argv, capsys)
    one_error_line(code, err, "deep.safetensors", "nested more than 64 levels")
    assert not list(tmp_path.glob("out*"))


def test_embedding_library_skips_a_deep_header(tmp_path):
    from sdtune.adapters.textual_inversion.library import EmbeddingLibrary

    folder = tmp_path / "emb"
    folder.mkdir()
    deep_safetensors(folder / "bad.safetensors", 100_000)
    messages: list[str] = []
    lib = EmbeddingLibrary([folder], echo=messages.append)
    assert lib.names == []
    (note,) = lib.skipped.values()
    assert "bad.safetensors" in note and "nested more than 64 levels" in note


def test_cli_generate_embeddings_folder_with_a_deep_header_warns(tmp_path, capsys):
    folder = tmp_path / "emb"
    folder.mkdir()
    deep_safetensors(folder / "bad.safetensors", 100_000)
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", "x", "--embeddings", str(folder), "--steps", "1", "--width", "32",
                            "--height", "32", "--seed", "1", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert any(ln.startswith("warning: skipped") and "bad.safetensors" in ln and "nested" in ln
               for ln in err.splitlines()), err
    assert len(list(out.glob("*.png"))) == 1


# -- 7. training names ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    from sdtune.toy.testing import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("bad_input_data"), 2, size=32)


@pytest.mark.parametrize("method,extra,words", [
    ("ti", ["--token", "../../evil"], ["token '../../evil'", "one word"]),
    ("ti", ["--token", "a/b"], ["token 'a/b'", "one word"]),
    ("ti", ["--token", "a\x07b"], ["token 'a\\x07b'", "control characters"]),
    ("ti", ["--token", "a\udcffb"], ["token 'a\\udcffb'", "invalid UTF-8"]),
    ("ti", ["--token", ".star"], ["must not start with '.'"]),
    ("ti", ["--token", "<state>"], ["file name 'state'", "run folder"]),
    ("ti", ["--token", "<a>", "--output-name", "."], ["output_name '.'", "only dots"]),
    ("ti", ["--token", "<a>", "--output-name", ".."], ["output_name '..'", "only dots"]),
    ("ti", ["--token", "<a>", "--output-name", "a/b"], ["output_name 'a/b'", "plain file name"]),
    ("ti", ["--token", "<a>", "--output-name", "a\nb"], ["output_name 'a\\nb'", "control characters"]),
    ("ti", ["--token", "<a>", "--output-name", "state"], ["output_name 'state'", "run folder"]),
    ("ti", ["--token", "<a>", "--output-name", "checkpoints"], ["output_name 'checkpoints'", "run folder"]),
    ("lora", ["--output-name", "samples"], ["output_name 'samples'", "run folder"]),
    ("lora", ["--output-name", "Class_Images"], ["output_name 'Class_Images'", "run folder"]),
    ("lora", ["--output-name", "a\tb"], ["control characters"]),
])
def test_cli_train_bad_names(tmp_path, capsys, toy_data, method, extra, words):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", method, "--data", str(toy_data), "--out", str(out), "--steps", "1",
                            "--resolution", "32", "--no-progress", "--no-tensorboard", *extra], capsys)
    one_error_line(code, err, *words)
    assert not out.exists()


@pytest.mark.parametrize("name", [".", "..", "...", "a/b", "a\\b", "a\x00b", "a\x1bb", "state", "CHECKPOINTS",
                                  "samples", "class_images"])
def test_config_check_values_refuses_output_names(tmp_path, name):
    from sdtune.training.config import TrainConfig

    cfg = TrainConfig(method="lora", data=str(tmp_path), out=str(tmp_path / "out"), output_name=name)
    with pytest.raises(SdtuneError) as e:
        cfg.check_values()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["my_lora", "star.v2", "state2", "日本語"])
def test_config_check_values_accepts_plain_names(tmp_path, name):
    from sdtune.training.config import TrainConfig

    TrainConfig(method="lora", data=str(tmp_path), out=str(tmp_path / "out"), output_name=name).check_values()


@pytest.mark.parametrize("method,extra,words", [
    ("lora", ["--target", "atn"], ["atn", "match no UNet module"]),
    ("ti", ["--token", "<a>", "--init", "qzxvwqzxvw"], ["qzxvwqzxvw"]),
])
def test_cli_train_refused_after_the_out_folder_was_made_leaves_no_folder(tmp_path, capsys, toy_data, method, extra,
                                                                          words):
    """These are refused once the model is loaded, after the output folder was created (its writability is
    tested by making it): a refused run must not leave an empty --out behind."""
    out = tmp_path / "new" / "run"
    code, _, err = run_cli(["train", method, "--data", str(toy_data), "--out", str(out), "--steps", "1",
                            "--resolution", "32", "--no-progress", "--no-tensorboard", *extra], capsys)
    assert code == 2 and all(w in err for w in words), err
    assert not out.exists()


def test_cli_train_refused_keeps_an_out_folder_that_was_there(tmp_path, capsys, toy_data):
    out = tmp_path / "mine"
    out.mkdir()
    code, _, err = run_cli(["train", "lora", "--data", str(toy_data), "--out", str(out), "--steps", "1",
                            "--resolution", "32", "--no-progress", "--no-tensorboard", "--target", "atn"], capsys)
    assert code == 2 and out.is_dir()  # not this run's to remove


def test_cli_resume_with_another_method_is_refused_before_loading(tmp_path, capsys, toy_data):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "lora", "--data", str(toy_data), "--out", str(out), "--steps", "1",
                            "--resolution", "32", "--no-progress", "--no-tensorboard"], capsys)
    assert code == 0, err
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, _, err = run_cli(["train", "ti", "--data", str(toy_data), "--out", str(out), "--resume", "auto",
                            "--token", "<a>", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "holds a 'lora' run, not 'ti'" in err and "sdtune train lora" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
