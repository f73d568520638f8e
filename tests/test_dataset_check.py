"""`sdtune dataset check`: the report, its heuristics (near-duplicates, mixed styles, sizes) and exit codes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from sdtune.cli import main
from sdtune.training.dataset_check import check_dataset, near_duplicate_groups


def photo(seed: int, size=(96, 72), grey: bool = False) -> Image.Image:
    """A distinct, photo-like image per seed: random low-frequency colour field plus a few discs, with noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    a = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 20)
        a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    a += rng.normal(0, 4, a.shape)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).copy()
    return img.convert("L").convert("RGB") if grey else img


def flat(seed: int, size=(96, 72)) -> Image.Image:
    """A flat-colour illustration: one colour, no detail."""
    c = tuple(int(v) for v in np.random.default_rng(seed).integers(40, 220, 3))
    return Image.new("RGB", size, c)


def busy(seed: int, size=(96, 72)) -> Image.Image:
    """A highly detailed image: coloured noise."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).copy()


def fill(folder, images, captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(f"image {i}")
    return folder


def levels(rep):
    return [(p.level, p.message) for p in rep.pitfalls]


def has(rep, level, text):
    return any(lv == level and text in msg for lv, msg in levels(rep))


def run(capsys, *args):
    code = 0
    try:
        main(["dataset", "check", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_toy_dataset_report_and_exit_zero(tmp_path, capsys):
    main(["toy", "dataset", "--out", str(tmp_path / "stars"), "-n", "5", "--shape", "star"])
    capsys.readouterr()
    code, out, _ = run(capsys, tmp_path / "stars", "--method", "ti", "--resolution", "64")
    assert code == 0
    assert "5 readable of 5 image files" in out
    assert "width 64/64/64, height 64/64/64 (min/median/max)" in out
    assert "5 square, 0 landscape, 0 portrait" in out
    assert "modes:    RGB 5" in out and "5 with caption, 0 missing, 0 empty" in out
    assert "only" not in out and "verdict:  usable" in out
    code, out, _ = run(capsys, tmp_path / "stars", "--method", "hypernetwork", "--resolution", "64", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["usable"] and rep["readable"] == 5 and rep["modes"] == {"RGB": 5}
    assert any(p["level"] == "warning" and "Hypernetwork usually needs 50 or more" in p["message"]
               for p in rep["pitfalls"])
    # the toy world renders images far below SD's size: at 512 they are flagged as tiny
    rep = check_dataset(tmp_path / "stars", method="ti")
    assert has(rep, "warning", "5 image(s) are less than half the training size 512")


@pytest.mark.parametrize("method,n,warned", [("ti", 2, True), ("ti", 4, False), ("dreambooth", 8, True),
                                             ("dreambooth", 12, False), ("lora", 12, True)])
def test_image_count_advice_per_method(tmp_path, method, n, warned):
    rep = check_dataset(fill(tmp_path, [photo(i, (40, 30)) for i in range(n)]), method=method, resolution=32)
    assert any("usually needs" in m for _, m in levels(rep)) == warned


def test_near_duplicates_are_grouped(tmp_path):
    base = [photo(i) for i in range(8)]
    buf = io.BytesIO()
    base[0].save(buf, "JPEG", quality=60)
    copies = [Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),          # re-saved as JPEG
              base[0].resize((150, 112), Image.Resampling.LANCZOS),            # resized
              ImageEnhance.Brightness(base[3]).enhance(1.08)]                  # slightly brighter
    rep = check_dataset(fill(tmp_path, base + copies), resolution=64)
    assert rep.near_duplicates == [["000.png", "008.png", "009.png"], ["003.png", "010.png"]]
    assert has(rep, "warning", "2 group(s) of near-duplicate images (3 extra copies)")


def test_same_layout_in_another_colour_is_not_a_duplicate():
    from sdtune.toy import world
    from sdtune.training.dataset_check import dhash_bits, thumbnail

    scenes = [world.Scene("star", c, "white") for c in ("red", "blue", "green")] + [world.Scene("star", "red", "white")]
    ims = [world.render(s) for s in scenes]
    groups = near_duplicate_groups(np.stack([dhash_bits(i) for i in ims]), np.stack([thumbnail(i) for i in ims]))
    assert groups == [[0, 3]]


def test_many_near_duplicates_means_too_alike(tmp_path):
    ims = [photo(0)] + [ImageEnhance.Brightness(photo(0)).enhance(1 + k / 100) for k in range(1, 5)] + [photo(1)]
    rep = check_dataset(fill(tmp_path, ims), resolution=64)
    assert has(rep, "warning", "images too alike: 4 of 6 images are near-duplicates")


def test_mixed_styles_flagged_for_style_runs_only(tmp_path):
    colour = fill(tmp_path / "colour", [photo(i) for i in range(6)])
    assert not any("styles look mixed" in m for _, m in levels(check_dataset(colour, method="lora", resolution=64)))
    bw = fill(tmp_path / "bw", [photo(i, grey=i % 2 == 0) for i in range(6)])
    rep = check_dataset(bw, method="hypernetwork", resolution=64)
    assert rep.style["black_and_white"] == 3
    assert has(rep, "warning", "styles look mixed: 3 of 6 images are black-and-white")
    assert not any("styles look mixed" in m for _, m in levels(check_dataset(bw, method="dreambooth", resolution=64)))
    detail = fill(tmp_path / "detail", [flat(i) if i % 2 else busy(i) for i in range(6)])
    rep = check_dataset(detail, method="lora", resolution=64)
    assert any("styles look mixed" in m and "edge-density spread" in m for _, m in levels(rep))


def test_sizes_aspects_modes_captions_and_unreadable(tmp_path):
    d = tmp_path / "d"
    fill(d, [photo(0, (200, 100)), photo(1, (100, 300)), photo(2, (120, 120))], captions=False)
    (d / "000.txt").write_text("a wide one")
    (d / "001.txt").write_text("")
    Image.new("L", (130, 130), 90).save(d / "grey.png")
    (d / "broken.png").write_bytes((d / "002.png").read_bytes()[:100])
    (d / "list.csv").write_text("a,b")
    rep = check_dataset(d, method="lora", resolution=128)
    assert (rep.image_files, rep.readable) == (5, 4)
    assert rep.unreadable == [["broken.png", "truncated"]]
    assert rep.sizes == {"width": [100, 125, 200], "height": [100, 125, 300]}
    assert rep.aspect["landscape"] == 1 and rep.aspect["portrait"] == 1 and rep.aspect["square"] == 2
    assert rep.modes == {"RGB": 3, "L": 1}
    assert rep.captions["missing"] == ["002.png", "grey.png"] and rep.captions["empty"] == ["001.png"]
    assert rep.ignored_files == ["list.csv"]
    assert has(rep, "error", "1 unreadable image file(s): broken.png (truncated)")
    assert has(rep, "warning", "3 of 4 images have no caption")
    assert has(rep, "note", "1 image(s) are longer than 2:1: 001.png")
    assert has(rep, "note", "image(s) are smaller than 128")
    assert rep.usable


def test_unusable_folders_exit_two(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, _ = run(capsys, tmp_path / "empty")
    assert code == 2 and "NOT usable" in out and "the folder is empty" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not really")
    (bad / "b.txt").write_text("caption")
    code, out, _ = run(capsys, bad, "--json")
    rep = json.loads(out)
    assert code == 2 and not rep["usable"] and rep["unreadable"] == [["a.png", "not an image"]]


def test_missing_folder_is_one_line_error(tmp_path, capsys):
    code, out, err = run(capsys, tmp_path / "nope")
    assert code == 2 and out == ""
    assert err.startswith("error: dataset folder") and "does not exist" in err and err.count("\n") == 1


def test_kohya_layout_in_report(tmp_path, capsys):
    fill(tmp_path / "5_sks cat", [photo(i, (64, 64)) for i in range(3)], captions=False)
    fill(tmp_path / "raw", [photo(9, (64, 64))])
    code, out, _ = run(capsys, tmp_path, "--resolution", "64", "--method", "dreambooth")
    assert code == 0
    assert "5_sks cat: 3 images x 5 repeats" in out
    assert "3 from folder names" in out and "0 missing" in out
    assert "folder 'raw' (1 images) is skipped" in out
