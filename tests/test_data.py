"""The training-data layer: folder scanning and validation, image decoding, captions, transforms, latent cache."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.training import captions as cap
from sdtune.training import images as imgs
from sdtune.training.data import scan_dataset
from sdtune.training.examples import Augment, bucket_batches, example_rng, make_example


def photo(seed: int, size=(48, 40)) -> Image.Image:
    """A small image with smooth colour gradients, noise and a disc: distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    a = np.stack([np.sin(x * 3 + seed), np.cos(y * 4 + seed), x * y], -1) * 100 + 120
    a += rng.normal(0, 8, a.shape)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, min(w, h) / 4
    a[(np.mgrid[0:h, 0:w][1] - cx) ** 2 + (np.mgrid[0:h, 0:w][0] - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).copy()


def write(folder, name, img, caption=None, **save):
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / name, **save)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder / name


def scan(folder, **kw):
    kw.setdefault("resolution", 32)
    return scan_dataset(folder, **kw)


# ------------------------------------------------------------------------------------------------ folder errors

def test_missing_file_empty_and_imageless_folders_are_one_line_errors(tmp_path):
    with pytest.raises(SdtuneError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(SdtuneError, match="is a file, not a folder"):
        scan(tmp_path / "f.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")  # hidden files do not count
    with pytest.raises(SdtuneError, match="is empty"):
        scan(tmp_path / "empty")
    d = tmp_path / "notes"
    d.mkdir()
    (d / "a.txt").write_text("a cat")
    (d / "readme.md").write_text("#")
    (d / "clip.mp4").write_bytes(b"\0")
    with pytest.raises(SdtuneError) as e:
        scan(d)
    msg = str(e.value)
    assert "no images in" in msg and "1 .md" in msg and "1 .mp4" in msg and "1 caption files" in msg
    assert "\n" not in msg


def test_images_in_a_plain_subfolder_get_a_hint(tmp_path):
    write(tmp_path / "images", "a.png", photo(0))
    with pytest.raises(SdtuneError, match=r"folder 'images' with 1 images.*<repeats>_<name>"):
        scan(tmp_path)


def test_plain_folder_captions_and_single_image_warning(tmp_path):
    write(tmp_path, "a.png", photo(0), "\ufeff  a photo of a cat \n\n")
    ds = scan(tmp_path)
    assert len(ds) == 1
    it = ds.items[0]
    assert it.caption == "a photo of a cat" and it.repeats == 1 and it.size == (48, 40) and it.target == (32, 32)
    assert any("only 1 image" in w for w in ds.warnings)
    img = it.load()
    assert img.size == (32, 32) and img.mode == "RGB"


def test_min_images(tmp_path):
    write(tmp_path, "a.png", photo(0))
    write(tmp_path, "b.png", photo(1))
    with pytest.raises(SdtuneError, match="only 2 readable image.*at least 3"):
        scan(tmp_path, min_images=3)


def test_kohya_repeat_folders(tmp_path):
    write(tmp_path / "10_sks dog", "a.png", photo(0))              # no caption: the folder's name
    write(tmp_path / "10_sks dog", "b.png", photo(1), "sks dog on grass")
    write(tmp_path / "2_style", "c.png", photo(2), "x")
    write(tmp_path / "0_off", "d.png", photo(3))                   # 0 repeats: skipped like kohya
    write(tmp_path / "misc", "e.png", photo(4))
    write(tmp_path / ".ipynb_checkpoints", "f.png", photo(5))      # hidden: ignored silently
    ds = scan(tmp_path)
    got = {it.rel: (it.repeats, it.caption, it.caption_source) for it in ds.items}
    assert got == {"10_sks dog/a.png": (10, "sks dog", "folder"), "10_sks dog/b.png": (10, "sks dog on grass", "file"),
                   "2_style/c.png": (2, "x", "file")}
    assert ds.images_per_epoch == 22
    order = ds.epoch_order(seed=1, epoch=0)
    assert sorted(order) == sorted([0] * 10 + [1] * 10 + [2] * 2)
    assert order == ds.epoch_order(seed=1, epoch=0) != ds.epoch_order(seed=1, epoch=1)
    text = "\n".join(ds.warnings)
    assert "'misc'" in text and "'0_off'" in text and "ipynb" not in text
    assert "folder's name as caption" in text


def test_missing_empty_and_latin1_captions_are_reported(tmp_path):
    write(tmp_path, "a.png", photo(0), "ok")
    write(tmp_path, "b.png", photo(1))
    write(tmp_path, "c.png", photo(2), "   \n")
    write(tmp_path, "d.png", photo(3))
    (tmp_path / "d.caption").write_bytes("caf\xe9 au lait".encode("latin-1"))
    write(tmp_path, "e.png", photo(4))
    (tmp_path / "e.txt").write_bytes("line one\r\nline two".encode("utf-16"))
    (tmp_path / "notes.md").write_text("x")
    ds = scan(tmp_path)
    caps = {it.rel: it.caption for it in ds.items}
    assert caps == {"a.png": "ok", "b.png": "", "c.png": "", "d.png": "café au lait", "e.png": "line one line two"}
    text = "\n".join(ds.warnings)
    assert "1 of 5 images have no caption file (.txt/.caption): b.png" in text
    assert "1 caption file(s) are empty: c.png" in text
    assert "not UTF-8" in text and "d.caption" in text
    assert "notes.md" in text
    assert scan(tmp_path, caption_ext=".caption").items[0].caption == ""  # a.txt ignored then


# --------------------------------------------------------------------------------------------- bad image files

def _bad_folder(tmp_path):
    good = write(tmp_path, "good.png", photo(0))
    data = good.read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    b = tmp_path / "tmp.jpg"
    photo(1, (64, 64)).save(b, quality=95)
    jdata = b.read_bytes()
    b.unlink()
    (tmp_path / "half.jpg").write_bytes(jdata[: len(jdata) * 2 // 3])
    (tmp_path / "notes.png").write_text("this is text, renamed")
    (tmp_path / "empty.webp").write_bytes(b"")


def test_unreadable_images_are_an_error_naming_each(tmp_path):
    _bad_folder(tmp_path)
    with pytest.raises(SdtuneError) as e:
        scan(tmp_path)
    msg = str(e.value)
    assert msg.startswith("4 unreadable image(s):") and "--skip-bad" in msg and "\n" not in msg
    for name in ("half.png", "half.jpg", "notes.png (not an image)", "empty.webp (not an image)"):
        assert name in msg
    assert "half.jpg (truncated)" in msg


def test_skip_bad_skips_with_a_warning(tmp_path):
    _bad_folder(tmp_path)
    ds = scan(tmp_path, skip_bad=True)
    assert [it.rel for it in ds.items] == ["good.png"]
    assert {r for r, _ in ds.skipped} == {"half.png", "half.jpg", "notes.png", "empty.webp"}
    assert any(w.startswith("skipped 4 unreadable image(s)") for w in ds.warnings)


def test_only_bad_images_is_an_error_even_with_skip_bad(tmp_path):
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(SdtuneError, match="no readable images"):
        scan(tmp_path, skip_bad=True)


# ------------------------------------------------------------------------------------------------ image modes

def load(path):
    return imgs.open_image(path)


def test_rgba_la_and_palette_transparency_composite_on_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255                  # red everywhere ...
    a[:, 4:, 3] = 255                # ... but only the right half is opaque
    a[:, :4, 3] = 0
    rgb, facts = load(write(tmp_path, "rgba.png", Image.fromarray(a, "RGBA").copy()))
    px = np.asarray(rgb)
    assert rgb.mode == "RGB" and facts["alpha"] and facts["mode"] == "RGBA"
    assert (px[:, :4] == 255).all() and (px[:, 4:] == [255, 0, 0]).all()
    la = Image.fromarray(np.dstack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 128, np.uint8)]), "LA").copy()
    v = np.asarray(load(write(tmp_path, "la.png", la))[0])
    assert abs(int(v[0, 0, 0]) - (10 * 128 + 255 * 127) // 255) <= 1 and (v[..., 0] == v[..., 2]).all()
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    px = np.asarray(load(write(tmp_path, "p.png", p, transparency=1))[0])
    assert (px[0, 0] == 0).all() and (px[1, 1] == 255).all()   # index 1 (green) is transparent -> white


def test_opaque_alpha_is_not_reported_and_srgb_profile_is_kept(tmp_path):
    from PIL import ImageCms

    im = photo(0)
    rgb, facts = load(write(tmp_path, "opaque.png", im.convert("RGBA")))
    assert not facts["alpha"] and rgb.tobytes() == im.tobytes()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb, _ = load(write(tmp_path, "srgb.png", im, icc_profile=icc))
    assert rgb.tobytes() == im.tobytes()
    assert not any("transparency" in w for w in scan(tmp_path).warnings)


def test_greyscale_16bit_and_cmyk(tmp_path):
    g = np.asarray(load(write(tmp_path, "l.png", Image.new("L", (4, 4), 77)))[0])
    assert (g == 77).all()
    a16 = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(2, 0)
    im16 = Image.fromarray(a16)
    assert im16.mode == "I;16"
    rgb, facts = load(write(tmp_path, "deep.png", im16))
    assert facts["mode"] == "I;16"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 1, 128, 255]    # scaled, not clipped at 255
    i32 = Image.fromarray(np.array([[0, 1000, 65535]], np.int32), "I")
    assert np.asarray(imgs.to_rgb(i32))[0, :, 1].tolist() == [0, 4, 255]
    assert np.asarray(imgs.to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")))[0, :, 0].tolist() \
        == [0, 128, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))            # red in CMYK
    assert (np.asarray(load(write(tmp_path, "c.tif", cmyk))[0]) == [255, 0, 0]).all()
    rgb, facts = load(write(tmp_path, "c.jpg", cmyk, quality=95))
    assert facts["mode"] == "CMYK" and np.abs(np.asarray(rgb).astype(int) - [255, 0, 0]).max() <= 8


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    im = Image.fromarray(a).copy()
    exif = im.getexif()
    exif[0x0112] = 6                  # "rotate 90 CW to display"
    path = write(tmp_path, "rot.jpg", im, exif=exif, quality=95)
    rgb, facts = load(path)
    assert rgb.size == (20, 40) and facts["size"] == (20, 40) and facts["exif_rotated"]
    px = np.asarray(rgb).astype(int)
    assert px[5, 10, 0] > 200 and px[5, 10, 2] < 60      # the left (red) half is now on top
    assert px[35, 10, 2] > 200 and px[35, 10, 0] < 60
    ds = scan(tmp_path, resolution=16)
    assert ds.items[0].size == (20, 40) and any("EXIF" in w for w in ds.warnings)


def test_huge_image_is_resized_and_small_image_warned(tmp_path):
    big = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
    write(tmp_path, "big.jpg", big, quality=80)
    write(tmp_path, "small.png", photo(0, (20, 10)))
    ds = scan(tmp_path, resolution=64)
    it = {i.rel: i for i in ds.items}
    assert it["big.jpg"].size == (4000, 3000)
    img = it["big.jpg"].load()
    assert img.size == (64, 64)
    col = np.asarray(img)[:, 32, 0].astype(int)        # vertical gradient survives, centre crop keeps it all
    assert col[0] < 20 and col[-1] > 235 and (np.diff(col) >= 0).all()
    assert it["small.png"].load().size == (64, 64)
    assert any("1 image(s) are smaller than the training size 64" in w and "small.png (20x10)" in w
               for w in ds.warnings)


def test_identical_files_warned(tmp_path):
    p = write(tmp_path, "a.png", photo(0))
    shutil.copy(p, tmp_path / "b.png")
    write(tmp_path, "c.png", photo(1))
    assert any("identical files" in w and "a.png = b.png" in w for w in scan(tmp_path).warnings)


# ------------------------------------------------------------------------------------------------- fingerprint

def test_fingerprint_is_stable_and_tracks_content(tmp_path):
    d = tmp_path / "d"
    write(d, "a.png", photo(0), "one")
    write(d, "b.png", photo(1), "two")
    fp = scan(d).fingerprint()
    assert len(fp) == 64 and scan(d).fingerprint() == fp
    shutil.copytree(d, tmp_path / "elsewhere")
    assert scan(tmp_path / "elsewhere").fingerprint() == fp         # location does not matter
    (d / "b.txt").write_text("three")
    fp2 = scan(d).fingerprint()
    assert fp2 != fp
    photo(2).save(d / "a.png")
    assert scan(d).fingerprint() not in (fp, fp2)
    md = scan(d).metadata()
    assert md["sdtune_dataset_images"] == "2" and md["sdtune_dataset_hash"] == scan(d).fingerprint()


# ---------------------------------------------------------------------------------------------------- captions

@pytest.mark.parametrize("template,caption,expected", [
    ("a photo of a [name], [filewords]", "red hair, smiling", "a photo of a sks, red hair, smiling"),
    ("a photo of a [name], [filewords]", "", "a photo of a sks"),
    ("[filewords], art by [name]", "  ", "art by sks"),
    ("a [name] painting of [filewords]", "a dog", "a sks painting of a dog"),
    ("[name]", "ignored", "sks"),
])
def test_fill_template(template, caption, expected):
    assert cap.fill_template(template, caption, "sks") == expected


def test_caption_augmentations_are_seeded():
    c = "sks, red hair, smiling, outdoors, night"
    s1 = cap.shuffle_tags(c, random.Random(3), keep_first=1)
    assert s1 == cap.shuffle_tags(c, random.Random(3), keep_first=1)
    assert s1.startswith("sks, ") and sorted(s1.split(", ")) == sorted(c.split(", "))
    assert {cap.shuffle_tags(c, random.Random(s), keep_first=1) for s in range(20)} != {s1}
    dropped = cap.drop_tags(c, random.Random(0), 0.5, keep_first=2)
    assert dropped.startswith("sks, red hair") and set(dropped.split(", ")) <= set(c.split(", "))
    assert cap.drop_tags(c, random.Random(0), 1.0, keep_first=1) == "sks"
    assert cap.augment_caption(c, random.Random(0), caption_dropout=1.0) == ""
    assert cap.augment_caption(c, random.Random(0)) == c


# -------------------------------------------------------------------------------------------------- transforms

def test_to_tensor_range_layout_and_inverse():
    im = photo(0, (6, 4))
    t = imgs.to_tensor(im)
    assert t.dtype == torch.float32 and t.shape == (3, 4, 6)
    assert t.min() >= -1 and t.max() <= 1
    assert imgs.to_tensor(Image.new("RGB", (2, 2), (0, 255, 0)))[:, 0, 0].tolist() == [-1.0, 1.0, -1.0]
    assert imgs.to_image(t).tobytes() == im.tobytes()


def test_fit_center_and_random_crop():
    a = np.zeros((10, 30, 3), np.uint8)
    a[:, :, 0] = np.arange(30)[None, :] * 8
    im = Image.fromarray(a).copy()
    c = imgs.fit_image(im, (10, 10))
    assert c.size == (10, 10) and np.asarray(c)[0, :, 0].tolist() == (np.arange(10, 20) * 8).tolist()
    r1 = imgs.fit_image(im, (10, 10), crop="random", rng=random.Random(5), zoom=(1.0, 1.5))
    r2 = imgs.fit_image(im, (10, 10), crop="random", rng=random.Random(5), zoom=(1.0, 1.5))
    assert r1.size == (10, 10) and r1.tobytes() == r2.tobytes()
    outs = {imgs.fit_image(im, (10, 10), crop="random", rng=random.Random(s)).tobytes() for s in range(10)}
    assert len(outs) > 3
    assert imgs.hflip(c).tobytes() == Image.fromarray(np.asarray(c)[:, ::-1].copy()).tobytes()


def test_colour_jitter_seeded_and_off_by_default():
    im = photo(3)
    assert imgs.colour_jitter(im, random.Random(0)).tobytes() == im.tobytes()
    j1 = imgs.colour_jitter(im, random.Random(1), brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
    j2 = imgs.colour_jitter(im, random.Random(1), brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
    assert j1.tobytes() == j2.tobytes() != im.tobytes() and j1.size == im.size and j1.mode == "RGB"


def test_buckets():
    b = imgs.make_buckets(512, step=64)
    assert (512, 512) in b and all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in b)
    assert all(max(w, h) / min(w, h) <= 2 for w, h in b)
    assert imgs.nearest_bucket((1600, 900), b) == (640, 384)
    assert imgs.nearest_bucket((900, 1600), b) == (384, 640)
    assert imgs.nearest_bucket((1000, 1000), b) == (512, 512)


def test_bucketed_scan_and_batches(tmp_path):
    write(tmp_path, "wide.png", photo(0, (96, 48)))
    write(tmp_path, "tall.png", photo(1, (48, 96)))
    write(tmp_path, "sq.png", photo(2, (64, 64)))
    write(tmp_path, "sq2.png", photo(3, (64, 64)))
    ds = scan(tmp_path, resolution=64, buckets=True, bucket_step=16)
    t = {it.rel: it.target for it in ds.items}
    assert t["wide.png"][0] > t["wide.png"][1] and t["tall.png"][0] < t["tall.png"][1] and t["sq.png"] == (64, 64)
    assert ds.items[[i.rel for i in ds.items].index("wide.png")].load().size == t["wide.png"]
    targets = [it.target for it in ds.items]
    batches = bucket_batches(targets, ds.epoch_order(0, 0), 2)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert all(len({targets[i] for i in b}) == 1 for b in batches)


def test_make_example_is_deterministic_per_seed(tmp_path):
    write(tmp_path, "a.png", photo(0, (64, 48)), "sks, red, big, round")
    it = scan(tmp_path).items[0]
    aug = Augment(crop="random", zoom=(1.0, 1.3), flip_p=0.5, jitter=0.1, shuffle=True, keep_first=1)
    e1 = make_example(it, aug, example_rng(7, 0, 0))
    e2 = make_example(it, aug, example_rng(7, 0, 0))
    assert torch.equal(e1.pixels, e2.pixels) and e1.caption == e2.caption and e1.flipped == e2.flipped
    assert e1.pixels.shape == (3, 32, 32) and e1.caption.startswith("sks, ")
    lite = make_example(it, aug, example_rng(7, 0, 0), with_pixels=False)
    assert lite.pixels is None and (lite.caption, lite.flipped) == (e1.caption, e1.flipped)
    flips = {make_example(it, aug, example_rng(7, 0, i), with_pixels=False).flipped for i in range(20)}
    assert flips == {True, False}
    plain = make_example(it, Augment(), example_rng(0, 0, 0))
    assert torch.equal(plain.pixels, imgs.to_tensor(it.load())) and plain.caption == it.caption
    assert Augment().cacheable and not aug.cacheable


# ------------------------------------------------------------------------------------------------ latent cache

@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    from sdtune.models.testing import VAE_CFG

    torch.manual_seed(0)
    return AutoencoderKL(**VAE_CFG).eval()  # the VAE of tiny_components("sd1"), without building the rest


def test_latent_cache_is_deterministic_scaled_and_flip_exact(tiny_vae):
    from sdtune.training.latents import encode_latents, latent_scaling

    ims = [photo(0, (16, 16)), photo(1, (16, 16)), photo(2, (24, 16))]
    a = encode_latents(tiny_vae, ims, batch_size=2, flip_variants=True)
    b = encode_latents(tiny_vae, ims, batch_size=2, flip_variants=True)
    assert len(a) == 3 and a[0].mean.shape == (4, 8, 8) and a[2].mean.shape == (4, 8, 12)
    for x, y in zip(a, b):
        assert torch.equal(x.mean, y.mean) and torch.equal(x.flip_mean, y.flip_mean)
    scale, shift = latent_scaling(tiny_vae)
    assert (scale, shift) == (tiny_vae.config.scaling_factor, 0.0)
    with torch.no_grad():
        ref = tiny_vae.encode(imgs.to_tensor(ims[0])[None]).latent_dist
        ref_flip = tiny_vae.encode(imgs.to_tensor(imgs.hflip(ims[0]))[None]).latent_dist
    torch.testing.assert_close(a[0].mean, ref.mean[0] * scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[0].std, ref.std[0] * scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[0].flip_mean, ref_flip.mean[0] * scale, rtol=1e-4, atol=1e-5)
    assert a[0].get(True) is a[0].flip_mean
    s1 = a[0].get(generator=torch.Generator().manual_seed(0))
    s2 = a[0].get(generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, a[0].mean)
    only = encode_latents(tiny_vae, ims[:1])
    assert only[0].flip_mean is None
    with pytest.raises(ValueError, match="flip_variants"):
        only[0].get(flipped=True)


def test_latent_scaling_uses_shift_factor():
    from types import SimpleNamespace

    from sdtune.training.latents import latent_scaling

    assert latent_scaling(SimpleNamespace(config=SimpleNamespace(scaling_factor=0.3611, shift_factor=0.1159))) \
        == (0.3611, 0.1159)
    assert latent_scaling(SimpleNamespace(config=SimpleNamespace(scaling_factor=0.13025, shift_factor=None))) \
        == (0.13025, 0.0)
