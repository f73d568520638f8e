"""The toy world, the tiny model's tokenizer and the `sdtune toy` commands."""

import random

import pytest

from sdtune.cli import main
from sdtune.toy import world
from sdtune.toy.tiny import write_tokenizer


def test_render_is_deterministic_and_64px():
    rng = random.Random(0)
    scene = world.random_scene(rng, styles=world.STYLES)
    a, b = world.render(scene), world.render(scene)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()


def test_base_training_never_names_held_out_concepts():
    rng = random.Random(1)
    seen = {"shape": 0, "forgotten": 0, "outline": 0}
    for _ in range(2000):
        scene, caption = world.base_training_sample(rng)
        words = caption.split()
        assert scene.shape not in world.ABSENT_SHAPES
        assert scene.style not in world.HELD_OUT["absent_styles"]
        assert not set(words) & {*world.WORDLESS_SHAPES, "outline", "outlined"}
        if scene.shape in world.WORDLESS_SHAPES:
            named = world.FORGOTTEN_WORDS[scene.shape] in words
            assert named or " shape on " in caption
            seen["forgotten" if named else "shape"] += 1
        if scene.style == "outline":
            assert words[-7] == world.FORGOTTEN_WORDS["outline"]  # "... zoutline red circle on a white background"
            seen["outline"] += 1
        else:
            assert world.FORGOTTEN_WORDS["outline"] not in words
    assert min(seen.values()) > 100  # every way of captioning word-less concepts occurs


def test_forgotten_words_are_not_in_the_bundled_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    from sdtune.toy.tiny import tiny_model_path

    tok = CLIPTokenizer.from_pretrained(str(tiny_model_path() / "tokenizer"))
    for word in world.FORGOTTEN_WORDS.values():
        assert word not in world.vocabulary_words()
        assert len(tok(word).input_ids) > 3  # byte pieces, not one token


def test_tokenizer_words_are_single_tokens_with_clip_specials(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = tok("a red star on a gray background").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "red</w>", "star</w>", "on</w>", "a</w>",
                                              "gray</w>", "background</w>", "<|endoftext|>"]
    # Unknown words fall back to byte pieces instead of an unknown token.
    assert tok.unk_token_id not in tok("zebra").input_ids[1:-1]


def test_toy_dataset_command_writes_images_and_captions(tmp_path):
    out = tmp_path / "data"
    main(["toy", "dataset", "--out", str(out), "-n", "3", "--shape", "heart", "--caption", "a photo of sks {colour} shape"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    assert all(p.with_suffix(".txt").read_text().startswith("a photo of sks ") for p in pngs)


@pytest.mark.parametrize("args, needle", [
    (["toy", "dataset", "--out", "{tmp}/d", "--shape", "hexagon"], "unknown shape"),
    (["toy", "judge", "{tmp}/missing.png"], "no such image"),
    (["toy", "judge", "{tmp}/text.png"], "not a readable image"),
])
def test_toy_commands_reject_bad_input_in_one_line(tmp_path, capsys, args, needle):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path) for a in args])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_toy_dataset_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.png").write_bytes(b"x")
    with pytest.raises(SystemExit):
        main(["toy", "dataset", "--out", str(out), "-n", "2"])
    assert (out / "keep.png").read_bytes() == b"x"
    assert "not empty" in capsys.readouterr().err


def test_build_tiny_is_a_cli_command_and_writes_its_stage(tmp_path):
    """`sdtune toy build-tiny` (the tiny model's own trainer, in the package): the VAE stage runs and saves."""
    import os
    import stat

    from click.testing import CliRunner

    from sdtune.atomic import FILE_MODE
    from sdtune.cli import _register, cli

    _register()
    r = CliRunner().invoke(cli, ["toy", "build-tiny", "vae", "--steps", "1", "--batch", "1", "--work",
                                 str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    vae = tmp_path / "w" / "vae.safetensors"
    assert vae.is_file() and stat.S_IMODE(os.stat(vae).st_mode) == FILE_MODE
    assert "scaling_factor" in r.output
