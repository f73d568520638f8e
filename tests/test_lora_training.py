"""LoRA training options on tiny random models: rank/alpha (printed, in metadata), targets (attention, ff, conv),
text-encoder LoRAs with their own learning rate (lora_te_/lora_te1_/lora_te2_ keys that pass the self-check), the
self-check after every save, --prompt with per-image captions, optional optimizers, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from sdtune.cli.testing import run_cli
from sdtune.errors import SdtuneError
from sdtune.training import TrainConfig, Trainer, train
from sdtune.training.methods.lora import LoraOptions
from sdtune.training.prior import instance_caption
from sdtune.toy.testing import write_toy_dataset
from sdtune.training.testing import tiny_loaded

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
torch.set_num_threads(1)


def config(tmp_path, data, name="out", options=None, **kw):
    base = dict(method="lora", data=str(data), out=str(tmp_path / name), steps=2, lr=1e-3, resolution=32,
                save_every=0, progress=False, tensorboard=False, options=options or LoraOptions())
    base.update(kw)
    return TrainConfig(**base)


def keys_and_meta(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys()), f.metadata()


@pytest.mark.parametrize("family,prefixes", [("sd1", {"lora_te_"}), ("sdxl", {"lora_te1_", "lora_te2_"})])
def test_text_encoder_lora_keys_targets_and_metadata(tmp_path, data, family, prefixes):
    said: list[str] = []
    opts = LoraOptions(rank=4, alpha=2, targets=["attn", "ff", "conv"], text_encoder=True)
    r = train(config(tmp_path, data, options=opts), model=tiny_loaded(family), echo=said.append)
    keys, meta = keys_and_meta(r.final)  # the save already passed the self-check (it raises otherwise)
    te = {k.split("_text")[0] + "_" for k in keys if k.startswith("lora_te")}
    assert te == prefixes
    assert any("ff_net_0_proj." in k for k in keys)
    assert any(("_conv1." in k or "_in_layers_2." in k) for k in keys)  # ResNet convs: diffusers or SGM naming
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["sdtune_lora_scale"] == "0.5"
    assert any("alpha/rank = 0.5" in s for s in said)


def test_text_encoder_has_its_own_learning_rate(tmp_path, data, sd1):
    opts = LoraOptions(text_encoder=True, text_encoder_lr=2e-4)
    t = Trainer(config(tmp_path, data, options=opts, lr=1e-3), model=copy.deepcopy(sd1), echo=lambda s: None)
    t.run()
    lrs = sorted(g["lr"] for g in t.optimizer.param_groups)
    assert lrs == pytest.approx([2e-4, 1e-3])


def test_text_encoder_lora_trains_text_encoder_weights(tmp_path, data, sd1):
    opts = LoraOptions(text_encoder=True)
    model = copy.deepcopy(sd1)
    t = Trainer(config(tmp_path, data, options=opts, steps=3), model=model, echo=lambda s: None)
    t.run()
    sd = t.method.state_dict()
    te_b = [v for k, v in sd.items() if k.startswith("text_encoder.") and "lora_B" in k]
    assert te_b and any(bool(v.abs().sum() > 0) for v in te_b)


def test_self_check_failure_stops_the_run(tmp_path, data, sd1, monkeypatch):
    import sdtune.adapters.lora as lora_pkg

    def broken(path, *a, **k):
        raise SdtuneError(f"{path.name} failed the LoRA self-check: 3 trained module(s) got no LoRA layer")

    monkeypatch.setattr(lora_pkg, "verify_lora_file", broken)
    with pytest.raises(SdtuneError, match="failed its self-check"):
        train(config(tmp_path, data), model=copy.deepcopy(sd1), echo=lambda s: None)


def test_self_check_is_called_with_the_trained_deltas(tmp_path, data, sd1, monkeypatch):
    import sdtune.adapters.lora as lora_pkg

    calls = []
    real = lora_pkg.verify_lora_file

    def spy(path, pipe, deltas, **k):
        calls.append((path, sorted(deltas)))
        return real(path, pipe, deltas, **k)

    monkeypatch.setattr(lora_pkg, "verify_lora_file", spy)
    train(config(tmp_path, data, steps=2, save_every=1, keep_checkpoints="all"), model=copy.deepcopy(sd1),
          echo=lambda s: None)
    assert len(calls) == 2 and all(len(d) > 0 for _, d in calls)


def test_instance_prompt_rule():
    p = "a photo of sks shape"
    assert instance_caption("", p, True) == p
    assert instance_caption("whatever the folder says", p, False) == p
    assert instance_caption("+ on a black background", p, True) == f"{p}, on a black background"
    assert instance_caption("+", p, True) == p
    assert instance_caption("a red sks heart", p, True) == "a red sks heart"
    assert instance_caption("a red sks heart", None, True) == "a red sks heart"


def test_prompt_applies_to_training_captions(tmp_path, sd1):
    d = write_toy_dataset(tmp_path / "d", 3, size=32)
    (d / "000.txt").unlink()
    (d / "001.txt").write_text("+ on a white background")
    (d / "002.txt").write_text("a red sks heart")
    t = Trainer(config(tmp_path, d, options=LoraOptions(prompt="a photo of sks shape")), model=copy.deepcopy(sd1),
                echo=lambda s: None)
    t.run()
    caps = sorted(it.caption for it in t.dataset.items)
    assert caps == ["a photo of sks shape", "a photo of sks shape, on a white background", "a red sks heart"]


# ------------------------------------------------------------------------------------------------ bad input

def test_rank_larger_than_a_layer_is_refused_before_training(tmp_path, data, sd1):
    with pytest.raises(SdtuneError, match="rank 100 is larger than .*dimension"):
        train(config(tmp_path, data, options=LoraOptions(rank=100)), model=copy.deepcopy(sd1), echo=lambda s: None)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_alpha_zero_and_other_bad_options(tmp_path, data):
    with pytest.raises(SdtuneError, match="alpha 0 must be > 0"):
        config(tmp_path, data, options=LoraOptions(alpha=0)).check_values()
    with pytest.raises(SdtuneError, match="add --text-encoder"):
        config(tmp_path, data, options=LoraOptions(text_encoder_lr=1e-4)).check_values()
    with pytest.raises(SdtuneError, match="match no UNet module"):
        train(config(tmp_path, data, options=LoraOptions(targets=["nope"])), model=tiny_loaded("sd1"),
              echo=lambda s: None)
    with pytest.raises(SdtuneError, match="--prompt is empty"):
        config(tmp_path, data, options=LoraOptions(prompt="  ")).check_values()


@pytest.mark.parametrize("name,package", [("prodigy", "prodigyopt"), ("adamw8bit", "bitsandbytes")])
def test_optional_optimizers_say_what_is_missing(tmp_path, data, name, package):
    try:
        __import__(package)
        pytest.skip(f"{package} is installed here")
    except Exception:
        pass
    with pytest.raises(SdtuneError, match=f"needs the {package} package.*--optimizer adamw"):
        config(tmp_path, data, optimizer=name).check_values()


def test_resume_on_a_model_of_another_family_is_refused(tmp_path, data, sd1):
    train(config(tmp_path, data), model=copy.deepcopy(sd1), echo=lambda s: None)
    with pytest.raises(SdtuneError, match="do not match this LoRA"):
        train(config(tmp_path, data, steps=3, resume="auto"), model=tiny_loaded("sdxl"), echo=lambda s: None)


def test_lora_of_another_family_is_refused_at_generation(tmp_path, data, sd1):
    from sdtune.adapters.lora import PipelineLoras

    r = train(config(tmp_path, data), model=copy.deepcopy(sd1), echo=lambda s: None)
    with pytest.raises(SdtuneError, match="is a SD ?1.* LoRA but .* is "):
        PipelineLoras(tiny_loaded("sdxl")).set([(r.final, 1.0)])


def test_cli_train_lora_options(tmp_path, data, capsys):
    r = run_cli(["train", "lora", "--data", str(data), "--out", str(tmp_path / "o"), "--rank", "8", "--alpha", "4",
                 "--target", "attn", "--target", "ff", "--text-encoder", "--text-encoder-lr", "5e-5", "--prompt",
                 "a photo of sks shape", "--class-prompt", "a photo of a shape", "--dry-run"], capsys)
    code, output = r.code, r.text
    assert code == 0, output
    import tomllib

    lora = tomllib.loads(output)["lora"]
    assert lora["targets"] == ["attn", "ff"] and lora["text_encoder_lr"] == 5e-05
    assert lora["class_prompt"] == "a photo of a shape"
    r = run_cli(["train", "lora", "--data", str(data), "--out", str(tmp_path / "o"), "--alpha", "0", "--dry-run"],
                capsys)
    code, output = r.code, r.text
    assert code != 0 and "alpha 0 must be > 0" in output


def test_resume_with_text_encoder_lora_repeats_the_uninterrupted_run(tmp_path, data, sd1):
    opts = LoraOptions(text_encoder=True, text_encoder_lr=5e-4, targets=["attn", "ff"])
    full = train(config(tmp_path, data, "full", options=opts, steps=4), model=copy.deepcopy(sd1), echo=lambda s: None)
    train(config(tmp_path, data, "part", options=opts, steps=2), model=copy.deepcopy(sd1), echo=lambda s: None)
    rest = train(config(tmp_path, data, "part", options=opts, steps=4, resume="auto"), model=copy.deepcopy(sd1),
                 echo=lambda s: None)
    assert rest.losses == full.losses[2:]
