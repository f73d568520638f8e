"""sdtune.formats: safe reading, refusal of bad/malicious files, atomic writes, and identify() for every kind."""

from __future__ import annotations

import json
import os
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtune.errors import SdtuneError
from sdtune.formats import load_pickle, read_safetensors_metadata, read_shapes, read_state_dict, save_safetensors_atomic
from sdtune.formats.identify import identify

# ------------------------------------------------------------------ helpers


class _Boom:
    """Pickles to `os.system("touch MARKER")`: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_malicious(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Boom(marker)}, path)
    return path


def _bad_file(kind: str, tmp: Path) -> Path:
    if kind == "missing":
        return tmp / "nope.safetensors"
    if kind == "directory":
        d = tmp / "adir.safetensors"
        d.mkdir()
        return d
    if kind == "text-as-safetensors":
        p = tmp / "readme.safetensors"
        p.write_text("This is not a model, just some text that someone renamed.\n" * 20)
        return p
    if kind == "truncated-safetensors":
        p = tmp / "cut.safetensors"
        save_file({"a": torch.randn(64, 64), "b": torch.randn(64)}, str(p))
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p
    if kind == "truncated-header":
        p = tmp / "head.safetensors"
        p.write_bytes(struct.pack("<Q", 500) + b'{"a": {')
        return p
    if kind == "corrupt-header":
        p = tmp / "corrupt.safetensors"
        header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": "x"}}'
        p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
        return p
    if kind == "unsupported-ext":
        p = tmp / "weights.onnx"
        p.write_bytes(b"\0" * 16)
        return p
    if kind == "empty-ckpt":
        p = tmp / "empty.ckpt"
        p.write_bytes(b"")
        return p
    if kind == "text-as-ckpt":
        p = tmp / "notes.ckpt"
        p.write_text("hello world\n" * 50)
        return p
    if kind == "truncated-ckpt":
        p = tmp / "cut.ckpt"
        torch.save({"state_dict": {"w": torch.randn(256, 256)}}, p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])
        return p
    if kind == "malicious-pickle":
        return make_malicious(tmp / "evil.ckpt", tmp / "PWNED")
    raise AssertionError(kind)


BAD_KINDS = ["missing", "directory", "text-as-safetensors", "truncated-safetensors", "truncated-header",
             "corrupt-header", "unsupported-ext", "empty-ckpt", "text-as-ckpt", "truncated-ckpt", "malicious-pickle"]
EXPECTED_WORDS = {"missing": "no such file", "directory": "directory", "text-as-safetensors": "text file",
                  "truncated-safetensors": "truncated", "truncated-header": "truncated", "corrupt-header": "corrupt",
                  "unsupported-ext": "unsupported", "empty-ckpt": "empty", "text-as-ckpt": "text file",
                  "truncated-ckpt": "corrupt or truncated", "malicious-pickle": "refusing"}


# ------------------------------------------------------------------ reading


def test_safetensors_round_trip_with_metadata(tmp_path):
    p = save_safetensors_atomic({"x": torch.arange(6.0).reshape(2, 3)}, tmp_path / "a.safetensors",
                                {"ss_network_dim": "8"})
    assert torch.equal(read_state_dict(p)["x"], torch.arange(6.0).reshape(2, 3))
    assert read_safetensors_metadata(p) == {"ss_network_dim": "8"}
    assert read_shapes(p) == ({"x": (2, 3)}, {"ss_network_dim": "8"})
    assert [f.name for f in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    target = save_safetensors_atomic({"x": torch.ones(1)}, tmp_path / "b.safetensors")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_safetensors_atomic({"x": torch.zeros(1)}, target)
    assert [f.name for f in tmp_path.iterdir()] == ["b.safetensors"]  # old file intact, no temp file
    assert torch.equal(read_state_dict(target)["x"], torch.ones(1))


def test_shared_tensors_are_saved(tmp_path):
    base = torch.randn(4, 4)
    p = save_safetensors_atomic({"a": base, "b": base, "c": base[0]}, tmp_path / "s.safetensors")
    sd = read_state_dict(p)
    assert torch.equal(sd["a"], sd["b"]) and torch.equal(sd["c"], base[0])


def test_ckpt_state_dict_nesting(tmp_path):
    p = tmp_path / "m.ckpt"
    torch.save({"global_step": 3, "state_dict": {"model.w": torch.ones(3), "model.b": torch.zeros(1)}}, p)
    assert set(read_state_dict(p)) == {"model.w", "model.b"}


def test_lightning_callback_in_ckpt_is_tolerated_without_import(tmp_path, monkeypatch):
    """Old SD .ckpt files pickle a Lightning ModelCheckpoint next to the weights; it is stubbed, never imported."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    p = tmp_path / "old.ckpt"
    torch.save({"callbacks": {"cb": ModelCheckpoint()}, "state_dict": {"w": torch.ones(2)}}, p)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    assert set(read_state_dict(p)) == {"w"}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_inputs_raise_one_line_errors(tmp_path, kind):
    path = _bad_file(kind, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SdtuneError) as err:
        read_state_dict(path)
    msg = str(err.value)
    assert "\n" not in msg and EXPECTED_WORDS[kind] in msg.lower(), msg
    with pytest.raises(SdtuneError):
        identify(path) if kind != "directory" else read_shapes(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert not (tmp_path / "PWNED").exists()


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    evil = make_malicious(tmp_path / "evil.pt", marker)
    for fn in (load_pickle, read_state_dict, identify):
        with pytest.raises(SdtuneError, match="refusing to load evil.pt"):
            fn(evil)
    assert not marker.exists()


def test_safetensors_header_limits(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"\0" * 64)  # absurd header length, binary content
    with pytest.raises(SdtuneError, match="not a safetensors file"):
        read_safetensors_metadata(p)


# ------------------------------------------------------------------ identify


def _st(path: Path, tensors: dict, meta: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def _ldm_keys(family: str) -> dict[str, torch.Tensor]:
    z = torch.zeros
    sd = {"model.diffusion_model.input_blocks.0.0.weight": z(8, 4, 3, 3), "first_stage_model.encoder.conv_in.weight":
          z(8, 3, 3, 3)}
    if family == "sd1":
        sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = z(10, 8)
    elif family == "sd2":
        sd["cond_stage_model.model.token_embedding.weight"] = z(10, 8)
    elif family == "sdxl":
        sd["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = z(10, 8)
        sd["conditioner.embedders.1.model.token_embedding.weight"] = z(10, 8)
    elif family == "sdxl-refiner":
        sd["conditioner.embedders.0.model.token_embedding.weight"] = z(10, 8)
    return sd


def _make(kind: str, tmp: Path) -> Path:
    z = torch.zeros
    if kind == "checkpoint-ckpt":
        p = tmp / "model.ckpt"
        torch.save({"state_dict": _ldm_keys("sd1")}, p)
        return p
    if kind.startswith("checkpoint-"):
        return _st(tmp / f"{kind}.safetensors", _ldm_keys(kind.split("-", 1)[1]))
    if kind == "vae-ldm":
        return _st(tmp / "vae.safetensors", {"encoder.down.0.block.0.conv1.weight": z(8, 8, 3, 3),
                                             "decoder.conv_in.weight": z(8, 4, 3, 3)})
    if kind == "vae-diffusers":
        return _st(tmp / "vae.safetensors", {"encoder.down_blocks.0.resnets.0.conv1.weight": z(8, 8, 3, 3),
                                             "decoder.conv_in.weight": z(8, 4, 3, 3)})
    if kind == "ti-diffusers":
        return _st(tmp / "learned_embeds.safetensors", {"<cat-toy>": z(768)})
    if kind == "ti-diffusers-bin":
        p = tmp / "learned_embeds.bin"
        torch.save({"<cat-toy>": z(1024)}, p)
        return p
    if kind == "ti-a1111":
        p = tmp / "style.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": z(4, 768)}, "name": "style",
                    "step": 1500, "sd_checkpoint_name": "v1-5"}, p)
        return p
    if kind == "ti-kohya":
        return _st(tmp / "emb.safetensors", {"emb_params": z(3, 1024)})
    if kind == "ti-sdxl":
        return _st(tmp / "emb.safetensors", {"clip_l": z(2, 768), "clip_g": z(2, 1280)})
    if kind == "lora-kohya":
        k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        t = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        return _st(tmp / "lora.safetensors", {f"{k}.lora_down.weight": z(4, 768), f"{k}.lora_up.weight": z(320, 4),
                                              f"{k}.alpha": torch.tensor(4.0), f"{t}.lora_down.weight": z(4, 768),
                                              f"{t}.lora_up.weight": z(768, 4), f"{t}.alpha": torch.tensor(4.0)},
                   {"ss_network_dim": "4", "ss_network_alpha": "4.0", "ss_base_model_version": "sd_v1",
                    "ss_tag_frequency": json.dumps({"x": {"cat": 3}})})
    if kind == "lora-sdxl-kohya":
        k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
        return _st(tmp / "lora.safetensors", {f"{k}.lora_down.weight": z(8, 2048), f"{k}.lora_up.weight": z(640, 8),
                                              "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                              z(8, 1280)})
    if kind == "lora-peft":
        k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        return _st(tmp / "pytorch_lora_weights.safetensors", {f"{k}.lora_A.weight": z(4, 1024),
                                                              f"{k}.lora_B.weight": z(320, 4)})
    if kind == "lycoris-loha":
        k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        return _st(tmp / "loha.safetensors", {f"{k}.hada_w1_a": z(320, 4), f"{k}.hada_w1_b": z(4, 768),
                                              f"{k}.hada_w2_a": z(320, 4), f"{k}.hada_w2_b": z(4, 768),
                                              f"{k}.alpha": torch.tensor(1.0)})
    if kind == "hypernetwork":
        p = tmp / "hn.pt"
        layer = {"linear.0.weight": z(1536, 768), "linear.0.bias": z(1536), "linear.1.weight": z(768, 1536),
                 "linear.1.bias": z(768)}
        torch.save({768: [layer, layer], 320: [{"linear.0.weight": z(640, 320)}] * 2, "step": 100, "name": "hn",
                    "layer_structure": [1, 2, 1], "activation_func": "relu",
                    "optimizer_state_dict": {"state": {0: {"exp_avg": z(3)}}}}, p)
        return p
    if kind == "unet-diffusers":
        return _st(tmp / "diffusion_pytorch_model.safetensors", {
            "conv_in.weight": z(8, 4, 3, 3), "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            z(8, 2048), "add_embedding.linear_1.weight": z(8, 16)})
    if kind == "unknown":
        return _st(tmp / "thing.safetensors", {"foo.bar": z(3), "baz.qux": z(2, 2)})
    raise AssertionError(kind)


IDENTIFY_CASES = [
    ("checkpoint-sd1", "checkpoint", "sd1"), ("checkpoint-sd2", "checkpoint", "sd2"),
    ("checkpoint-sdxl", "checkpoint", "sdxl"), ("checkpoint-sdxl-refiner", "checkpoint", "sdxl-refiner"),
    ("checkpoint-ckpt", "checkpoint", "sd1"), ("vae-ldm", "vae", None), ("vae-diffusers", "vae", None),
    ("ti-diffusers", "embedding", "sd1"), ("ti-diffusers-bin", "embedding", "sd2"), ("ti-a1111", "embedding", "sd1"),
    ("ti-kohya", "embedding", "sd2"), ("ti-sdxl", "embedding", "sdxl"), ("lora-kohya", "lora", "sd1"),
    ("lora-sdxl-kohya", "lora", "sdxl"), ("lora-peft", "lora", "sd2"), ("lycoris-loha", "lora", "sd1"),
    ("hypernetwork", "hypernetwork", "sd1"), ("unet-diffusers", "unet", "sdxl"), ("unknown", "unknown", None),
]


@pytest.mark.parametrize("case,kind,family", IDENTIFY_CASES)
def test_identify(tmp_path, case, kind, family):
    info = identify(_make(case, tmp_path))
    assert (info.kind, info.family) == (kind, family)
    assert info.tensor_count > 0 and info.summary
    assert json.dumps(info.to_dict(), default=str)


def test_identify_details(tmp_path):
    lora = identify(_make("lora-kohya", tmp_path))
    assert lora.details["ranks"] == {4: 2} and lora.details["targets"] == {"unet": 1, "text_encoder": 1}
    assert lora.metadata["ss_network_dim"] == "4" and lora.details["network"] == "LoRA"
    assert identify(_make("lycoris-loha", tmp_path)).details["network"] == "LoHa"
    ti = identify(_make("ti-a1111", tmp_path))
    assert ti.details["vectors"] == 4 and ti.metadata["name"] == "style" and ti.metadata["step"] == "1500"
    hn = identify(_make("hypernetwork", tmp_path))
    assert hn.details["sizes"] == [320, 768] and hn.metadata["activation_func"] == "relu"
    assert not any("exp_avg" in line for line in hn.summary)  # optimizer state is not part of the network


def test_identify_diffusers_folder(tmp_path):
    from sdtune.models.testing import tiny_pipeline

    tiny_pipeline("sd2").save_pretrained(tmp_path / "m")
    info = identify(tmp_path / "m")
    assert (info.kind, info.family, info.format) == ("diffusers", "sd2", "diffusers-folder")
    assert info.details["prediction_type"] == "v_prediction" and info.tensor_count > 100
    assert identify(tmp_path / "m" / "vae").kind == "vae"
    with pytest.raises(SdtuneError, match="not a diffusers folder"):
        identify(tmp_path / "m" / "tokenizer")
