"""LoRA module names: canonical (diffusers) <-> kohya, for SD1/SD2/SDXL, tiny and real layouts."""

from __future__ import annotations

import pytest
import torch

from sdtune.adapters.lora import keys as K

torch.set_num_threads(1)


def _module_names(family: str) -> list[str]:
    from sdtune.adapters.lora.models import target_modules
    from sdtune.models.testing import tiny_components

    return sorted(target_modules(tiny_components(family)))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_tiny_module_round_trips(family):
    from sdtune.adapters.lora.models import unet_layout_of
    from sdtune.models.testing import tiny_components

    layout = unet_layout_of(tiny_components(family))
    names = [n for n in _module_names(family) if K.is_lora_module(n)]
    assert len(names) > 40
    kohya = {n: K.to_kohya(n, family, layout) for n in names}
    assert len(set(kohya.values())) == len(names)
    for name, k in kohya.items():
        assert K.from_kohya(k, layout, family) == name, k


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_real_unet_module_round_trips(family):
    names = [n for n in K.family_module_names(family) if K.is_lora_module(n)]
    assert len(names) > 200
    for name in names:
        assert K.from_kohya(K.to_kohya(name, family), family=family) == name


def test_known_kohya_names():
    # SD1/SD2: diffusers paths; SDXL: SGM paths (as kohya's sd-scripts writes them)
    assert K.to_kohya("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd1") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert K.to_kohya("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "sd2") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert K.to_kohya("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "sdxl") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert K.to_kohya("unet.mid_block.attentions.0.proj_in", "sdxl") == "lora_unet_middle_block_1_proj_in"
    assert K.to_kohya("unet.up_blocks.0.upsamplers.0.conv", "sdxl") == "lora_unet_output_blocks_2_2_conv"
    assert K.to_kohya("unet.down_blocks.0.resnets.1.conv1", "sdxl") == "lora_unet_input_blocks_2_0_in_layers_2"
    assert K.to_kohya("unet.down_blocks.0.downsamplers.0.conv", "sdxl") == "lora_unet_input_blocks_3_0_op"
    assert K.to_kohya("text_encoder.text_model.encoder.layers.3.mlp.fc1", "sdxl") == \
        "lora_te1_text_model_encoder_layers_3_mlp_fc1"
    assert K.to_kohya("text_encoder_2.text_model.encoder.layers.31.mlp.fc2", "sdxl") == \
        "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    # diffusers-style SDXL names (other trainers) read as well
    assert K.from_kohya("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", family="sdxl") == \
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.mark.parametrize("bad", ["lora_unet_foo_bar", "lora_unet_down_blocks_0_resnets_0_norm1",
                                 "lora_te_text_model_embeddings_token_embedding", "lora_unet_input_blocks_99_1_proj_in",
                                 "something_else"])
def test_unknown_names_are_not_guessed(bad):
    assert K.from_kohya(bad, family="sdxl") is None
