"""DreamBooth (full UNet fine-tune) and prior preservation (shared with LoRA) on tiny random models: outputs (single
file + diffusers folder), class images generated once and cached, supplied class images validated, the prior
loss through the extra_loss hook."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.training import TrainConfig, Trainer, train
from sdtune.training.methods.dreambooth import DreamBoothOptions
from sdtune.training.methods.lora import LoraOptions
from sdtune.training.testing import tiny_loaded

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


def config(tmp_path, data, method="dreambooth", name="out", options=None, **kw):
    if options is None:
        options = DreamBoothOptions(class_prompt="a photo of a shape", num_class_images=2) \
            if method == "dreambooth" else LoraOptions()
    base = dict(method=method, data=str(data), out=str(tmp_path / name), steps=2, lr=1e-4, resolution=32,
                save_every=0, progress=False, tensorboard=False, sample_steps=2, options=options)
    base.update(kw)
    return TrainConfig(**base)


def test_dreambooth_writes_single_file_and_diffusers_folder(tmp_path, data, sd1):
    from sdtune.models import load_model

    opts = DreamBoothOptions(prompt="a photo of sks shape", class_prompt="a photo of a shape", num_class_images=2,
                             save_precision="fp32")
    model = copy.deepcopy(sd1)
    r = train(config(tmp_path, data, options=opts, steps=3, save_every=1, keep_checkpoints="best"), model=model,
              echo=lambda s: None)
    assert r.final.name == "dreambooth.safetensors" and r.final.is_file()
    folder = r.final.with_suffix("")
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    # pruned checkpoints leave no diffusers folders behind
    ckpt_dirs = [d for d in (r.out / "checkpoints").iterdir() if d.is_dir()]
    assert [d.name for d in ckpt_dirs] == ["dreambooth-000003"]
    trained = {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}
    base = sd1.pipe.unet.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in trained)  # it did train
    for src in (r.final, folder):
        back = load_model(str(src))
        assert back.family == "sd1"
        sd = back.pipe.unet.state_dict()
        assert all(torch.allclose(sd[k].float(), trained[k].float(), atol=1e-6) for k in trained)


def test_dreambooth_class_data_needs_a_class_prompt_unless_prior_is_off(tmp_path, data):
    # no class prompt at all is the automatic mode (tests/test_prior_auto.py); class images without one are not
    (tmp_path / "cls").mkdir()
    with pytest.raises(SdtuneError, match="--class-data needs --class-prompt"):
        config(tmp_path, data, options=DreamBoothOptions(class_data=str(tmp_path / "cls"))).check_values()
    config(tmp_path, data, options=DreamBoothOptions()).check_values()
    config(tmp_path, data, options=DreamBoothOptions(prior_preservation=False)).check_values()
    with pytest.raises(SdtuneError, match="text_encoder_lr is set"):
        config(tmp_path, data, options=DreamBoothOptions(prior_preservation=False, text_encoder_lr=1e-5)).check_values()


def test_dreambooth_text_encoder_trains_with_its_own_rate(tmp_path, data, sd1):
    opts = DreamBoothOptions(prior_preservation=False, train_text_encoder=True, text_encoder_lr=1e-5,
                             diffusers_folder=False, train_identifier=False)
    model = copy.deepcopy(sd1)
    t = Trainer(config(tmp_path, data, options=opts), model=model, echo=lambda s: None)
    t.run()
    assert sorted(g["lr"] for g in t.optimizer.param_groups) == pytest.approx([1e-5, 1e-4])
    te, base = model.pipe.text_encoder.state_dict(), sd1.pipe.text_encoder.state_dict()
    assert any(not torch.equal(te[k], base[k]) for k in te)
    assert not (t.out / "dreambooth").exists()  # diffusers_folder=False


def test_class_images_are_generated_once_and_reused(tmp_path, data, sd1):
    said: list[str] = []
    opts = LoraOptions(class_prompt="a photo of a shape", num_class_images=2)
    train(config(tmp_path, data, "lora", options=opts), model=copy.deepcopy(sd1), echo=said.append)
    folders = [d for d in (tmp_path / "out" / "class_images").iterdir() if d.is_dir()]
    assert len(folders) == 1 and sorted(p.name for p in folders[0].glob("*.png")) == ["00000.png", "00001.png"]
    assert (folders[0] / "key.json").is_file()
    mtimes = [p.stat().st_mtime_ns for p in sorted(folders[0].glob("*.png"))]
    assert any("generating 2 class image(s)" in s for s in said)
    said.clear()
    train(config(tmp_path, data, "lora", options=opts, steps=3, resume="auto"), model=copy.deepcopy(sd1),
          echo=said.append)
    assert any("reusing 2 cached class image(s)" in s for s in said)
    assert [p.stat().st_mtime_ns for p in sorted(folders[0].glob("*.png"))] == mtimes
    # another count (or prompt, model, resolution) is another cache entry
    said.clear()
    opts3 = LoraOptions(class_prompt="a photo of a shape", num_class_images=3)
    train(config(tmp_path, data, "lora", name="out3", options=opts3), model=copy.deepcopy(sd1), echo=said.append)
    assert any("generating 3 class image(s)" in s for s in said)


def test_prior_loss_changes_the_objective_and_is_deterministic(tmp_path, data, sd1):
    plain = train(config(tmp_path, data, "lora", name="a"), model=copy.deepcopy(sd1), echo=lambda s: None)
    opts = LoraOptions(class_prompt="a photo of a shape", num_class_images=2, prior_weight=0.5)
    p1 = train(config(tmp_path, data, "lora", name="b", options=opts), model=copy.deepcopy(sd1), echo=lambda s: None)
    p2 = train(config(tmp_path, data, "lora", name="c", options=opts), model=copy.deepcopy(sd1), echo=lambda s: None)
    assert p1.losses == p2.losses
    assert all(a > b for a, b in zip(p1.losses, plain.losses))  # instance loss + 0.5 * a positive prior term


def _write(folder, n, size, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, size, (200, 10, 10) if mode == "RGB" else None).save(folder / f"{i}.png")
    return folder


def test_supplied_class_images_are_validated(tmp_path, data, sd1):
    def run(folder, name):
        opts = LoraOptions(class_prompt="a photo of a shape", class_data=str(folder))
        said: list[str] = []
        train(config(tmp_path, data, "lora", name=name, options=opts), model=copy.deepcopy(sd1), echo=said.append)
        return said

    with pytest.raises(SdtuneError, match="smaller than the training resolution 32.*0.png \\(16x16\\)"):
        run(_write(tmp_path / "small", 2, (16, 16)), "o1")
    with pytest.raises(SdtuneError, match="not RGB: 0.png \\(L\\)"):
        run(_write(tmp_path / "grey", 1, (32, 32), "L"), "o2")
    with pytest.raises(SdtuneError, match="not RGB: 0.png \\(RGBA\\)"):
        run(_write(tmp_path / "rgba", 1, (32, 32), "RGBA"), "o3")
    said = run(_write(tmp_path / "big", 2, (48, 40)), "o4")
    assert any("centre-cropped and resized" in s for s in said)
    assert any("2 class image(s) (" in s for s in said)
    ok = run(_write(tmp_path / "exact", 2, (32, 32)), "o5")
    assert not any("resized" in s for s in ok)
    # with the resolution known, bad class images are refused before the model is even loaded
    cfg = config(tmp_path, data, "lora", name="o6", options=LoraOptions(class_prompt="a shape",
                                                                        class_data=str(tmp_path / "small")))
    with pytest.raises(SdtuneError, match="smaller than the training resolution 32"):
        cfg.check_values()
    with pytest.raises(SdtuneError, match="not RGB"):
        config(tmp_path, data, "lora", name="o7", resolution=None,
               options=LoraOptions(class_prompt="a shape", class_data=str(tmp_path / "grey"))).check_values()


def test_class_images_use_their_own_captions(tmp_path, data, sd1, monkeypatch):
    """kohya-style regularization images: a class image's .txt caption is its prompt in the prior term; images
    without one use --class-prompt."""
    from sdtune.training.methods.base import TrainingMethod

    folder = _write(tmp_path / "reg", 3, (32, 32))
    (folder / "0.txt").write_text("a red circle on a white background\n")
    (folder / "1.txt").write_text("  \n")  # empty: the class prompt applies
    seen: list[str] = []
    original = TrainingMethod.conditioning

    def recording(self, batch):
        seen.extend(batch.captions)
        return original(self, batch)

    monkeypatch.setattr(TrainingMethod, "conditioning", recording)
    said: list[str] = []
    opts = LoraOptions(prompt="a sks shape", class_prompt="a shape", class_data=str(folder))
    train(config(tmp_path, data, "lora", options=opts, steps=12, batch_size=2), model=copy.deepcopy(sd1),
          echo=said.append)
    assert any("3 class image(s)" in s and "1 with their own caption" in s for s in said)
    instance = {t.read_text().strip() for t in data.glob("*.txt")} | {"a sks shape"}
    class_caps = set(seen) - instance
    assert class_caps == {"a red circle on a white background", "a shape"}


def test_prior_on_sdxl_uses_time_ids(tmp_path, data):
    opts = LoraOptions(class_prompt="a photo of a shape", num_class_images=1)
    r = train(config(tmp_path, data, "lora", options=opts), model=tiny_loaded("sdxl"), echo=lambda s: None)
    assert r.final is not None and all(x == x for x in r.losses)


def test_cli_train_dreambooth_help_and_dry_run(tmp_path, data, capsys):
    from sdtune.cli.testing import run_cli

    def run(args):
        r = run_cli(args, capsys)
        return r.code, r.text

    code, out = run(["train", "dreambooth", "--help"])
    assert code == 0 and "--class-prompt" in out and "--no-prior-preservation" in out and "--class-data" in out
    code, out = run(["train", "dreambooth", "--data", str(data), "--out", str(tmp_path / "o"), "--class-data",
                     str(tmp_path), "--dry-run"])
    assert code != 0 and "needs --class-prompt" in out
    code, out = run(["train", "dreambooth", "--data", str(data), "--out", str(tmp_path / "o"), "--class-prompt",
                     "a photo of a shape", "--num-class-images", "10", "--prior-weight", "0.5", "--dry-run"])
    assert code == 0 and "prior_weight = 0.5" in out


def test_a_real_sized_unet_at_the_toy_rate_gets_one_warning(tmp_path, data, sd1, monkeypatch):
    # the default --lr (1e-4) suits the tiny model; a real UNet (hundreds of millions of weights, here: the size
    # threshold lowered to the tiny one's) at that rate is warned about, at 2e-6 it is not
    from sdtune.training.methods import dreambooth

    monkeypatch.setattr(dreambooth, "REAL_UNET_PARAMS", 0)
    opts = DreamBoothOptions(prior_preservation=False, diffusers_folder=False)
    for lr, warned in ((1e-4, 1), (2e-6, 0)):
        said: list[str] = []
        train(config(tmp_path, data, name=f"lr{lr}", options=opts, steps=1, lr=lr), model=copy.deepcopy(sd1),
              echo=said.append)
        assert sum(s.startswith(f"warning: lr {lr:g} is high for a full fine-tune") for s in said) == warned
    monkeypatch.undo()
    said = []
    train(config(tmp_path, data, name="tiny", options=opts, steps=1), model=copy.deepcopy(sd1), echo=said.append)
    assert not any("is high for a full fine-tune" in s for s in said)
