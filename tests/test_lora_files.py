"""LoRA files: the self-check against diffusers' own loader, kohya <-> diffusers round trips, LyCORIS, bad input.

Models are tiny and random. A PEFT LoRA with random (non-zero) lora_B is written with sdtune's writers, reloaded
with diffusers' `load_lora_weights` into a fresh model of the same architecture, and the reloaded deltas are
compared with PEFT's own deltas of the trained adapter."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sdtune.adapters.lora import (
    lora_deltas_from_peft,
    network_from_peft,
    read_lora,
    save_lora,
    verify_lora_file,
)
from sdtune.adapters.lora.network import LoraModule, LoraNetwork
from sdtune.errors import SdtuneError
from sdtune.formats.safe_io import read_safetensors_metadata, read_state_dict, save_safetensors_atomic

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning", "ignore::RuntimeWarning")
torch.set_num_threads(1)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1",
                "linear_2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def trained(family: str, *, unet=UNET_TARGETS, text=TEXT_TARGETS, seed: int = 0, unet_alpha=2, text_alpha=8,
            rank: int = 4):
    """Tiny components with PEFT LoRA adapters whose weights are all random (as after training)."""
    from peft import LoraConfig

    from sdtune.models.testing import tiny_components

    c = tiny_components(family)
    torch.manual_seed(seed)
    c["unet"].add_adapter(LoraConfig(r=rank, lora_alpha=unet_alpha, target_modules=list(unet),
                                     init_lora_weights=False))
    if text:
        for te in ("text_encoder", "text_encoder_2"):
            if c.get(te) is not None:
                c[te].add_adapter(LoraConfig(r=rank, lora_alpha=text_alpha, target_modules=list(text),
                                             init_lora_weights=False))
    return c


@pytest.fixture(scope="module")
def fresh():
    """Fresh models (other random base weights) to reload into: deltas do not depend on base weights."""
    from sdtune.models.testing import tiny_components

    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            cache[family] = tiny_components(family, seed=7)
        return cache[family]

    return get


# -- the self-check -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_written_file_reloads_in_diffusers_with_trained_deltas(family, fmt, fresh, tmp_path):
    comps = trained(family, unet=UNET_TARGETS + CONV_TARGETS)
    expected = lora_deltas_from_peft(comps)
    assert any(d.ndim == 4 and d.shape[-1] == 3 for d in expected.values())  # LoCon 3x3 convs included
    assert all(float(d.abs().max()) > 0 for d in expected.values())
    path = save_lora(network_from_peft(comps), tmp_path / f"l.safetensors", format=fmt)
    result = verify_lora_file(path, fresh(family), expected)
    n_text = sum(k.startswith("text_encoder") for k in expected)
    assert result.modules == len(expected) and n_text >= 12
    assert result.max_rel_error < 1e-6
    # sdtune reads back exactly what it wrote, alphas included (unet 2, text encoders 8)
    back = read_lora(path)
    assert back.family == family and set(back.modules) == set(expected)
    for name, d in back.deltas().items():
        torch.testing.assert_close(d, expected[name], rtol=1e-6, atol=1e-7)
    assert {m.alpha for n, m in back.modules.items() if n.startswith("unet.")} == {2.0}
    assert {m.alpha for n, m in back.modules.items() if n.startswith("text_encoder")} == {8.0}


def test_sd2_kohya_self_check(fresh, tmp_path):
    comps = trained("sd2", unet=["to_k", "to_v"], text=["q_proj", "v_proj"])
    expected = lora_deltas_from_peft(comps)
    path = save_lora(network_from_peft(comps), tmp_path / "sd2.safetensors")
    assert verify_lora_file(path, fresh("sd2"), expected).modules == len(expected)
    meta = read_safetensors_metadata(path)
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"


def test_fp16_file_passes_with_fp16_tolerance(fresh, tmp_path):
    comps = trained("sd1", text=())
    expected = lora_deltas_from_peft(comps)
    path = save_lora(network_from_peft(comps), tmp_path / "h.safetensors", dtype=torch.float16)
    result = verify_lora_file(path, fresh("sd1"), expected)
    assert 0 < result.max_rel_error <= result.tolerance == 5e-3


def test_self_check_catches_a_changed_or_missing_module(fresh, tmp_path):
    comps = trained("sd1", text=())
    expected = lora_deltas_from_peft(comps)
    path = save_lora(network_from_peft(comps), tmp_path / "ok.safetensors")
    sd, meta = read_state_dict(path), read_safetensors_metadata(path)
    key = next(k for k in sd if k.endswith("attn2_to_k.lora_up.weight"))
    changed = dict(sd)
    changed[key] = sd[key] * 1.5
    save_safetensors_atomic(changed, tmp_path / "changed.safetensors", meta)
    with pytest.raises(SdtuneError, match="different deltas.*attn2.to_k"):
        verify_lora_file(tmp_path / "changed.safetensors", fresh("sd1"), expected)
    mod = key.split(".")[0]
    dropped = {k: v for k, v in sd.items() if not k.startswith(mod + ".")}
    save_safetensors_atomic(dropped, tmp_path / "dropped.safetensors", meta)
    with pytest.raises(SdtuneError, match="got no LoRA layer in diffusers: unet.*attn2.to_k"):
        verify_lora_file(tmp_path / "dropped.safetensors", fresh("sd1"), expected)


def test_verify_leaves_the_trainers_adapter_alone(tmp_path):
    comps = trained("sd1", text=())
    unet = comps["unet"]
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    expected = lora_deltas_from_peft(comps)
    path = save_lora(network_from_peft(comps), tmp_path / "self.safetensors")
    verify_lora_file(path, comps, expected)  # into the training model itself
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable
    assert unet.active_adapters() == ["default"]
    assert "sdtune_verify" not in unet.peft_config
    torch.testing.assert_close(lora_deltas_from_peft(comps), expected, rtol=0, atol=0)


def test_text_encoder_with_only_qkv_loads_in_diffusers(fresh, tmp_path):
    """diffusers 0.42 cannot read kohya text-encoder LoRAs without out_proj/MLP modules; sdtune pads them with a
    zero module, and the self-check proves it (and fails without the padding)."""
    comps = trained("sdxl", unet=["to_k", "to_v"], text=["q_proj", "v_proj"])
    expected = lora_deltas_from_peft(comps)
    net = network_from_peft(comps)
    path = save_lora(net, tmp_path / "qv.safetensors")
    assert verify_lora_file(path, fresh("sdxl"), expected).modules == len(expected)
    assert set(read_lora(path).modules) == set(expected)  # the zero padding is not read back as a module
    assert len(json.loads(read_safetensors_metadata(path)["sdtune_zero_modules"])) == 2
    save_lora(net, tmp_path / "raw.safetensors", pad_for_diffusers=False)
    with pytest.raises(SdtuneError, match="does not load with diffusers"):
        verify_lora_file(tmp_path / "raw.safetensors", fresh("sdxl"), expected)


# -- formats and metadata -------------------------------------------------------------------------------------


def test_kohya_metadata_and_keys(tmp_path):
    comps = trained("sdxl", unet=UNET_TARGETS + ["conv1"], rank=4)
    path = save_lora(network_from_peft(comps), tmp_path / "style.safetensors", comment="heart shapes")
    meta = read_safetensors_metadata(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert meta["ss_training_comment"] == "heart shapes"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["sdtune_family"] == "sdxl" and json.loads(meta["sdtune_unet_layout"])["layers_per_block"] == 1
    keys = set(read_state_dict(path))
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)

    from sdtune.formats import identify

    info = identify(path)
    assert info.kind == "lora" and info.family == "sdxl"


def test_diffusers_layout_keeps_alpha_in_adapter_metadata(tmp_path):
    comps = trained("sd1", unet_alpha=1, text_alpha=16)
    path = save_lora(network_from_peft(comps), tmp_path / "pytorch_lora_weights.safetensors", format="diffusers")
    keys = set(read_state_dict(path))
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in keys)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)
    cfg = json.loads(read_safetensors_metadata(path)["lora_adapter_metadata"])
    assert cfg["unet.lora_alpha"] == 1 and cfg["text_encoder.lora_alpha"] == 16 and cfg["unet.r"] == 4
    # mixed alphas inside one component survive too
    net = read_lora(path)
    first = sorted(n for n in net.modules if n.startswith("unet."))[0]
    net.modules[first] = LoraModule(net.modules[first].down, net.modules[first].up, alpha=3.0)
    p2 = save_lora(net, tmp_path / "mixed.safetensors", format="diffusers")
    assert read_lora(p2).modules[first].alpha == 3.0
    assert {m.alpha for n, m in read_lora(p2).modules.items() if n != first and n.startswith("unet.")} == {1.0}


def test_reads_other_diffusers_layouts(tmp_path):
    """Old diffusers `lora.down/up`, attention-processor names and `.alpha` keys from converters."""
    sd = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.ones(2, 8),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": torch.ones(8, 2),
        "unet.mid_block.attentions.0.proj_in.lora.down.weight": torch.ones(2, 8),
        "unet.mid_block.attentions.0.proj_in.lora.up.weight": torch.ones(8, 2),
        "unet.mid_block.attentions.0.proj_in.alpha": torch.tensor(1.0),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": torch.ones(2, 8),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.ones(16, 2),
    }
    save_safetensors_atomic(sd, tmp_path / "old.safetensors")
    net = read_lora(tmp_path / "old.safetensors")
    assert set(net.modules) == {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                "unet.mid_block.attentions.0.proj_in",
                                "text_encoder.text_model.encoder.layers.0.mlp.fc1"}
    assert net.modules["unet.mid_block.attentions.0.proj_in"].alpha == 1.0
    assert net.modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"].alpha == 2.0  # no alpha: scale 1


def test_locon_tucker_core_is_folded_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    down, mid, up = torch.randn(4, 32, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g), \
        torch.randn(64, 4, 1, 1, generator=g)
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    save_safetensors_atomic({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid,
                             f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
                            tmp_path / "locon.safetensors", {"ss_network_module": "lycoris.kohya"})
    net = read_lora(tmp_path / "locon.safetensors")
    m = net.modules["unet.down_blocks.1.resnets.0.conv1"]
    ref = torch.einsum("oa,abkl,bi->oikl", up.flatten(1), mid, down.flatten(1)) * 2.0 / 4
    torch.testing.assert_close(m.delta(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo,key", [("OFT", "lora_unet_mid_block_attentions_0_proj_in.oft_blocks"),
                                      ("DoRA", "lora_unet_mid_block_attentions_0_proj_in.dora_scale")])
def test_other_lycoris_algorithms_are_refused_by_name(tmp_path, algo, key):
    save_safetensors_atomic({key: torch.ones(2, 2), "lora_unet_x.alpha": torch.tensor(1.0)},
                            tmp_path / "ly.safetensors")
    with pytest.raises(SdtuneError, match=f"{algo}.*supports LoRA, LoCon .*LoHa and LoKr"):
        read_lora(tmp_path / "ly.safetensors")


def test_a_checkpoint_given_as_a_lora_is_named_a_checkpoint(tmp_path):
    """A DreamBooth result passed as --lora was refused as "LyCORIS full (weight difference)": `.diff` matched
    inside `model.diffusion_model.`."""
    save_safetensors_atomic({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2),
                             "first_stage_model.encoder.conv_in.weight": torch.ones(2, 2)}, tmp_path / "db.safetensors")
    with pytest.raises(SdtuneError, match="is a model checkpoint .*not a LoRA.*--model"):
        read_lora(tmp_path / "db.safetensors")
    save_safetensors_atomic({"lora_unet_mid_block_attentions_0_proj_in.diff": torch.ones(2, 2)},
                            tmp_path / "full.safetensors")
    with pytest.raises(SdtuneError, match="LyCORIS full"):  # a real weight-difference file is still named as one
        read_lora(tmp_path / "full.safetensors")


# -- bad input ------------------------------------------------------------------------------------------------


def _one(down_shape=(2, 8), up_shape=(8, 2), alpha=1.0, fill=1.0) -> LoraNetwork:
    m = LoraModule(torch.full(down_shape, fill), torch.full(up_shape, fill), alpha)
    return LoraNetwork({"unet.mid_block.attentions.0.proj_in": m}, family="sd1")


def test_writer_refuses_rank_above_layer_size_and_alpha_zero(tmp_path):
    with pytest.raises(SdtuneError, match="rank 10 is larger than the layer allows.*min\\(out 8, in 8\\) = 8"):
        save_lora(_one((10, 8), (8, 10)), tmp_path / "big.safetensors")
    with pytest.raises(SdtuneError, match="alpha of .* is 0, so its scale alpha/rank would be 0"):
        save_lora(_one(alpha=0.0), tmp_path / "a0.safetensors", format="diffusers")
    assert not list(tmp_path.iterdir())


def test_reader_refuses_nan_alpha_zero_and_truncated_files(tmp_path):
    good = save_lora(_one(), tmp_path / "good.safetensors")
    sd, meta = read_state_dict(good), read_safetensors_metadata(good)
    nan = dict(sd)
    key = "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"
    nan[key] = sd[key].clone()
    nan[key][0, 0] = float("nan")
    save_safetensors_atomic(nan, tmp_path / "nan.safetensors", meta)
    with pytest.raises(SdtuneError, match="unet.mid_block.attentions.0.proj_in \\(lora_up\\).*NaN"):
        read_lora(tmp_path / "nan.safetensors")
    zero = dict(sd)
    zero["lora_unet_mid_block_attentions_0_proj_in.alpha"] = torch.tensor(0.0)
    save_safetensors_atomic(zero, tmp_path / "zero.safetensors", meta)
    with pytest.raises(SdtuneError, match="alpha .* is 0"):
        read_lora(tmp_path / "zero.safetensors")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 20])
    with pytest.raises(SdtuneError, match="truncated"):
        read_lora(tmp_path / "cut.safetensors")


def test_unknown_keys_are_listed_never_dropped(tmp_path, caplog):
    good = save_lora(_one(), tmp_path / "good.safetensors")
    sd = read_state_dict(good)
    sd["lora_unet_mystery_block_proj.lora_down.weight"] = torch.ones(2, 8)
    sd["lora_unet_mystery_block_proj.lora_up.weight"] = torch.ones(8, 2)
    sd["something_else"] = torch.ones(1)
    save_safetensors_atomic(sd, tmp_path / "odd.safetensors", read_safetensors_metadata(good))
    with pytest.raises(SdtuneError, match="3 key\\(s\\) are not LoRA modules.*lora_unet_mystery_block_proj.lora_down"
                                          ".*something_else"):
        read_lora(tmp_path / "odd.safetensors")
    with caplog.at_level(logging.WARNING):
        net = read_lora(tmp_path / "odd.safetensors", strict=False)
    assert net.unknown_keys == ["lora_unet_mystery_block_proj.lora_down.weight",
                                "lora_unet_mystery_block_proj.lora_up.weight", "something_else"]
    assert "something_else" in caplog.text and len(net.modules) == 1


def test_family_is_detected_from_shapes_keys_and_metadata():
    from sdtune.adapters.lora.network import detect_family

    def attn2(width):
        return {"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k":
                LoraModule(torch.zeros(4, width), torch.zeros(320, 4), 4.0)}

    assert detect_family(attn2(768), {}) == "sd1"
    assert detect_family(attn2(1024), {}) == "sd2"
    assert detect_family(attn2(2048), {"ss_base_model_version": "sd_v1"}) == "sdxl"  # shapes win
    te2 = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": LoraModule(torch.zeros(4, 64),
                                                                                      torch.zeros(64, 4), 4.0)}
    assert detect_family(te2, {}) == "sdxl"
    assert detect_family(attn2(64), {"ss_base_model_version": "sd_v2"}) == "sd2"
    assert detect_family(attn2(64), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}) == "sdxl"
    assert detect_family(attn2(64), {}) is None


def test_mixed_text_encoder_alphas_are_folded_for_diffusers(fresh, tmp_path):
    """diffusers loads per-module alphas of kohya text-encoder attention wrongly; the writer folds them into
    lora_up (same deltas) and the self-check proves the result, while the raw file fails it."""
    comps = trained("sd1", unet=["to_k"], text=["q_proj", "k_proj", "v_proj", "out_proj"])
    net = network_from_peft(comps)
    name = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    net.modules[name] = LoraModule(net.modules[name].down, net.modules[name].up, alpha=3.0)
    expected = net.deltas()
    path = save_lora(net, tmp_path / "mixed.safetensors")
    assert verify_lora_file(path, fresh("sd1"), expected).max_rel_error < 1e-5
    assert json.loads(read_safetensors_metadata(path)["sdtune_rescaled_alpha"]) == [name]
    save_lora(net, tmp_path / "raw.safetensors", pad_for_diffusers=False)
    with pytest.raises(SdtuneError, match="alpha_pattern keys did not match.*different deltas: " + name):
        verify_lora_file(tmp_path / "raw.safetensors", fresh("sd1"), expected)


def test_reads_files_written_by_diffusers_own_tools(tmp_path):
    """Interop: diffusers' `save_lora_weights` (PEFT layout, alpha in metadata) and its PEFT -> kohya converter
    (diffusers module names even for SDXL, `lora_te1_`) are read back to the trained deltas."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    comps = trained("sdxl", unet=["to_q", "to_k", "to_v", "to_out.0", "conv1"], text=["q_proj", "out_proj"],
                    unet_alpha=2, text_alpha=8)
    expected = lora_deltas_from_peft(comps)
    layers = {f"{c}_lora_layers": get_peft_model_state_dict(comps[c]) for c in ("unet", "text_encoder",
                                                                                 "text_encoder_2")}
    meta = {f"{c}_lora_adapter_metadata": comps[c].peft_config["default"].to_dict()
            for c in ("unet", "text_encoder", "text_encoder_2")}
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), **layers, **meta,
                                                weight_name="pytorch_lora_weights.safetensors")
    net = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert set(net.modules) == set(expected)
    for name, d in net.deltas().items():
        torch.testing.assert_close(d, expected[name], rtol=1e-6, atol=1e-7)

    unet_only = {k: v for k, v in expected.items() if k.startswith("unet.")}
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in layers["unet_lora_layers"].items()})
    save_safetensors_atomic(kohya, tmp_path / "diffusers_kohya.safetensors")
    net = read_lora(tmp_path / "diffusers_kohya.safetensors", layout=comps["unet"].config)
    assert set(net.modules) == set(unet_only)
    for name, d in net.deltas().items():  # the converter writes alpha = rank: scale 1 instead of 2/4
        torch.testing.assert_close(d * 0.5, unet_only[name], rtol=1e-6, atol=1e-7)
