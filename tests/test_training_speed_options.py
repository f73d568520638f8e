"""Memory/speed options that do not change what is trained: fused AdamW, channels-last UNet weights, torch.compile
of the UNet (the flag reaches torch.compile; compiling itself takes minutes on a CPU, too slow for a test)."""

from __future__ import annotations

import copy

import pytest
import torch

from sdtune.training import TrainConfig, Trainer
from sdtune.training.methods.lora import LoraOptions

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


def run(tmp_path, data, sd1, name, **kw):
    cfg = TrainConfig(method="lora", data=str(data), out=str(tmp_path / name), steps=3, lr=1e-3, resolution=32,
                      save_every=0, progress=False, tensorboard=False, options=LoraOptions(), **kw)
    trainer = Trainer(cfg, model=copy.deepcopy(sd1), echo=lambda s: None)
    return trainer, trainer.run()


def test_fused_adamw_trains_what_adamw_trains(tmp_path, data, sd1):
    _, plain = run(tmp_path, data, sd1, "plain")
    trainer, fused = run(tmp_path, data, sd1, "fused", optimizer="adamw_fused")
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    from diffusers.models.attention_processor import AttnProcessor2_0

    # SDPA attention (flash / memory-efficient kernels on GPUs) is what the trained UNet runs
    assert all(isinstance(p, AttnProcessor2_0) for p in trainer.unet.attn_processors.values())
    assert fused.losses == pytest.approx(plain.losses, rel=1e-5)


def test_channels_last_unet_trains_the_same(tmp_path, data, sd1):
    _, plain = run(tmp_path, data, sd1, "plain")
    trainer, cl = run(tmp_path, data, sd1, "cl", channels_last=True)
    conv = trainer.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert cl.losses == pytest.approx(plain.losses, rel=1e-5)


def test_compile_flag_compiles_the_unet_the_step_calls(tmp_path, data, sd1, monkeypatch):
    compiled = []

    def fake_compile(module, *args, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer, _ = run(tmp_path, data, sd1, "plain")
    assert compiled == []
    trainer, result = run(tmp_path, data, sd1, "compiled", compile=True)
    assert compiled == [trainer.model.pipe.unet] and result.stopped == "finished"


def test_latents_cached_on_disk_train_the_same_and_are_reused(tmp_path, data, sd1):
    _, plain = run(tmp_path, data, sd1, "plain")
    said: list[str] = []
    cfg = TrainConfig(method="lora", data=str(data), out=str(tmp_path / "disk"), steps=3, lr=1e-3, resolution=32,
                      save_every=0, progress=False, tensorboard=False, options=LoraOptions(), latent_cache="disk")
    disk = Trainer(cfg, model=copy.deepcopy(sd1), echo=said.append).run()
    assert disk.losses == plain.losses  # the same float32 latents, read back from files
    (folder,) = list((tmp_path / "disk" / "latent_cache").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["000000.safetensors", "000001.safetensors", "done"]
    assert any("to latents in" in s for s in said)
    said.clear()
    more = Trainer(cfg.replace(steps=5, resume="auto"), model=copy.deepcopy(sd1), echo=said.append).run()
    assert any("reusing the cache" in s for s in said) and not any("to latents in" in s for s in said)
    assert more.step == 5
