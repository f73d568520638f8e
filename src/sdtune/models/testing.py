"""Tiny random models of every family (SD1, SD2, SDXL, SDXL refiner) for tests.

They follow the real architectures and the rules `models/infer.py` uses for what weights cannot tell (heads of 64
channels, 8 heads for SD1, 32 GroupNorm groups), so even a file without sdtune metadata loads back identically.
Text encoders use the real CLIP vocabulary (49408 tokens) at width 64."""

from __future__ import annotations

from typing import Any

import torch

VAE_CFG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
               latent_channels=4, norm_num_groups=32, sample_size=32)
UNET_CFG: dict[str, dict[str, Any]] = {
    "sd1": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                "CrossAttnUpBlock2D"), block_out_channels=(32, 64), attention_head_dim=8, cross_attention_dim=64),
    "sd2": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                "CrossAttnUpBlock2D"), block_out_channels=(64, 128), attention_head_dim=[1, 2],
                cross_attention_dim=64, use_linear_projection=True),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",
                 "UpBlock2D"), block_out_channels=(64, 128), attention_head_dim=[1, 2], cross_attention_dim=128,
                 transformer_layers_per_block=[1, 2], use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8),
    "sdxl-refiner": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
                         "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(64, 128), attention_head_dim=[1, 2],
                         cross_attention_dim=64, transformer_layers_per_block=2, use_linear_projection=True,
                         addition_embed_type="text_time", addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=64 + 5 * 8),
}


def _text(hidden_act: str, pad_id: int, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77, hidden_act=hidden_act,
                         projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_components(family: str, seed: int = 0) -> dict[str, Any]:
    """Random components for `family`, ready for the family's diffusers pipeline class."""
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel

    from sdtune.models.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    # diffusers' top-level names resolve to its dummy placeholder classes for type checkers (its __init__ binds
    # utils.dummy_pt_objects first), so their instances have none of the real classes' methods
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                norm_num_groups=32, **UNET_CFG[family]).eval()  # type: ignore[attr-defined]
    vae = AutoencoderKL(**VAE_CFG).eval()  # type: ignore[attr-defined]  # dummy placeholder: see above
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    c: dict[str, Any] = {"unet": unet, "vae": vae}
    if family in ("sd1", "sd2"):
        sd2 = family == "sd2"
        c["text_encoder"] = _text("gelu" if sd2 else "quick_gelu", 0 if sd2 else 49407, False)
        c["tokenizer"] = clip_tokenizer("!" if sd2 else "<|endoftext|>")
        c["scheduler"] = DDIMScheduler(prediction_type="v_prediction" if sd2 else "epsilon", clip_sample=False,
                                       set_alpha_to_one=False, **sched_kw)
        return c
    c["scheduler"] = EulerDiscreteScheduler(prediction_type="epsilon", **sched_kw)
    c["text_encoder_2"] = _text("gelu", 0, True)
    c["tokenizer_2"] = clip_tokenizer("!")
    if family == "sdxl":
        c["text_encoder"] = _text("quick_gelu", 49407, False)
        c["tokenizer"] = clip_tokenizer()
    return c


def tiny_pipeline(family: str, seed: int = 0) -> Any:
    """A diffusers pipeline of the right class around `tiny_components(family)`."""
    from sdtune.models.single_file import build_pipeline

    c = tiny_components(family, seed)
    c.setdefault("text_encoder", None)
    c.setdefault("tokenizer", None)
    return build_pipeline(family, c)


def clip_l_text_encoder(seed: int = 0) -> Any:
    """A random text encoder of CLIP ViT-L/14's size (SD1's: 12 layers, width 768), for benchmarks where the
    encoder's real cost matters."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)).eval()


def save_tiny_pipeline(folder: Any, family: str = "sd1", seed: int = 0) -> Any:
    """`tiny_pipeline(family)` saved as a diffusers folder (a model path for the CLI and `load_model`); returns the
    pipeline, to build adapters that fit it."""
    from sdtune.models.loading import quiet_loading

    pipe = tiny_pipeline(family, seed)
    with quiet_loading():
        pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def unet_inputs(unet: Any, seed: int = 0, batch: int = 1, pooled_dim: int = 64) -> dict[str, Any]:
    """Deterministic UNet forward arguments (incl. SDXL's added conditions) for comparing two models."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    size = cfg.sample_size
    kw: dict[str, Any] = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([500] * batch),
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        n_ids = (cfg.projection_class_embeddings_input_dim - pooled_dim) // cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled_dim, generator=g),
                                   "time_ids": torch.randn(batch, n_ids, generator=g).abs() * 512}
    return kw
