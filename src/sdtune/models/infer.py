"""Diffusers configs for original-layout (LDM) weights: start from the shipped family config and overwrite every
size that can be read off the tensor shapes, so real checkpoints resolve to the real configs and small test
models of the same architecture load too.

What the shapes cannot tell (attention head counts, GroupNorm groups) follows the family's rule: SD1 uses 8 heads
per attention block, SD2/SDXL 64 channels per head, CLIP text encoders 64 channels per head; GroupNorm uses 32
groups (or the largest power of two that divides every width). Files written by `save_single_file` also carry
their exact configs in the safetensors metadata, which take precedence.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from sdtune.errors import SdtuneError

Shapes = Mapping[str, tuple[int, ...]]


def configs_dir(family: str) -> Path:
    return Path(str(resources.files("sdtune.models") / "configs" / family))


@lru_cache(maxsize=None)
def _family_config(family: str, component: str) -> dict[str, Any]:
    folder = configs_dir(family) / component
    name = "scheduler_config.json" if component == "scheduler" else (
        "tokenizer_config.json" if component.startswith("tokenizer") else "config.json")
    path = folder / name if component != "model_index" else configs_dir(family) / "model_index.json"
    return json.loads(path.read_text())


def family_config(family: str, component: str) -> dict[str, Any]:
    """A fresh copy of a shipped config (component: unet, vae, text_encoder, text_encoder_2, scheduler,
    tokenizer, tokenizer_2, model_index)."""
    return copy.deepcopy(_family_config(family, component))


def _sub(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _indices(keys: Any, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _groups(widths: list[int], preferred: int = 32) -> int:
    for g in (preferred, 32, 16, 8, 4, 2, 1):
        if all(w % g == 0 for w in widths):
            return g
    return 1


def _need(u: Mapping[str, tuple[int, ...]], key: str, what: str) -> tuple[int, ...]:
    if key not in u:
        raise SdtuneError(f"the {what} weights are incomplete (missing {key}); the file is damaged or not a "
                          "Stable Diffusion checkpoint")
    return u[key]


def unet_config(shapes: Shapes, family: str, prefix: str = "model.diffusion_model.") -> dict[str, Any]:
    """UNet2DConditionModel config for the LDM UNet under `prefix`."""
    cfg = family_config(family, "unet")
    u = _sub(shapes, prefix)
    conv_in = _need(u, "input_blocks.0.0.weight", "UNet")
    cfg["in_channels"], cfg["out_channels"] = conv_in[1], _need(u, "out.2.weight", "UNet")[0]
    n_in = max(_indices(u, r"input_blocks\.(\d+)\.")) + 1
    downs = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in u]
    levels = len(downs) + 1
    lpb, rem = divmod(n_in - 1 - len(downs), levels)
    if rem or lpb < 1:
        raise SdtuneError("the UNet has an unsupported block layout; only Stable Diffusion 1/2/XL UNets load")
    widths, attn, depth = [], [], []
    for level in range(levels):
        i = 1 + level * (lpb + 1)
        widths.append(_need(u, f"input_blocks.{i}.0.out_layers.3.weight", "UNet")[0])
        blocks = _indices(u, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
        attn.append(bool(blocks))
        depth.append(len(blocks))
    up_attn = []
    for level in range(levels):
        i = level * (lpb + 1)
        up_attn.append(bool(_indices(u, rf"output_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")))
    mid_depth = len(_indices(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    # Levels without attention ignore their entry, but diffusers sizes the middle block from the last one: fill
    # with the common depth when there is one (refiner: 4 everywhere), else 1 (SDXL base: [1, 2, 10]).
    used = {d for d in depth if d} | ({mid_depth} if mid_depth else set())
    filler = used.pop() if len(used) == 1 else 1
    depth = [d or filler for d in depth]
    if not depth[-1] or (mid_depth and not attn[-1]):
        depth[-1] = mid_depth or depth[-1] or 1
    if mid_depth and mid_depth != depth[-1]:
        raise SdtuneError("the UNet's middle block depth differs from its last level; this layout is unsupported")
    cfg["block_out_channels"] = widths
    cfg["layers_per_block"] = lpb
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    cfg["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn]
    if "transformer_layers_per_block" in cfg or any(d != 1 for d in depth):
        cfg["transformer_layers_per_block"] = depth if len(set(depth)) > 1 else depth[0]
    proj = next((s for k, s in u.items() if k.endswith(".proj_in.weight")), None)
    if proj is not None:
        cfg["use_linear_projection"] = len(proj) == 2
    ctx = next((s for k, s in u.items() if k.endswith("attn2.to_k.weight")), None)
    if ctx is not None:
        cfg["cross_attention_dim"] = ctx[1]
    temb = _need(u, "time_embed.0.weight", "UNet")[0]
    if temb != widths[0] * 4:
        cfg["time_embedding_dim"] = temb
    if family == "sd1":
        cfg["attention_head_dim"] = 8 if all(w % 8 == 0 for w in widths) else 1
    else:
        cfg["attention_head_dim"] = [max(1, w // 64) if w % 64 == 0 else 1 for w in widths]
    cfg["norm_num_groups"] = _groups(widths)
    if "label_emb.0.0.weight" in u:
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = u["label_emb.0.0.weight"][1]
    else:
        for k in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            cfg.pop(k, None)
    return cfg


def set_addition_time_embed_dim(cfg: dict[str, Any], pooled_dim: int, family: str) -> None:
    """SDXL's added-condition input is pooled text (pooled_dim) + 6 time ids (5 for the refiner) x embed dim."""
    if cfg.get("addition_embed_type") != "text_time":
        return
    n_ids = 5 if family == "sdxl-refiner" else 6
    rest = cfg["projection_class_embeddings_input_dim"] - pooled_dim
    if rest <= 0 or rest % n_ids:
        raise SdtuneError("the UNet's added-condition size does not match the text encoder; the checkpoint mixes "
                          "parts of different models")
    cfg["addition_time_embed_dim"] = rest // n_ids


def vae_config(shapes: Shapes, family: str, prefix: str = "first_stage_model.") -> dict[str, Any]:
    """AutoencoderKL config for LDM VAE weights under `prefix` ("" for standalone VAE files)."""
    cfg = family_config(family, "vae")
    v = _sub(shapes, prefix)
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise SdtuneError("the VAE weights are missing or not in the original layout (no encoder.down.*); "
                          "the file is damaged or not a Stable Diffusion VAE")
    widths = [_need(v, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in levels]
    cfg["block_out_channels"] = widths
    cfg["layers_per_block"] = len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\."))
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * len(widths)
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * len(widths)
    cfg["in_channels"] = _need(v, "encoder.conv_in.weight", "VAE")[1]
    cfg["out_channels"] = _need(v, "decoder.conv_out.weight", "VAE")[0]
    cfg["latent_channels"] = _need(v, "decoder.conv_in.weight", "VAE")[1]
    cfg["norm_num_groups"] = _groups(widths)
    return cfg


def clip_config(shapes: Shapes, base: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """CLIPTextConfig kwargs for a HF-layout CLIP text encoder under `prefix` (ending in "text_model.")."""
    c = _sub(shapes, prefix)
    vocab, hidden = _need(c, "embeddings.token_embedding.weight", "text encoder")
    cfg = dict(base)
    cfg.update(vocab_size=vocab, hidden_size=hidden,
               max_position_embeddings=_need(c, "embeddings.position_embedding.weight", "text encoder")[0],
               num_hidden_layers=len(_indices(c, r"encoder\.layers\.(\d+)\.")),
               intermediate_size=_need(c, "encoder.layers.0.mlp.fc1.weight", "text encoder")[0],
               num_attention_heads=hidden // 64 if hidden % 64 == 0 else 1)
    if cfg["num_hidden_layers"] == 0:
        raise SdtuneError("the text encoder has no layers; the file is damaged")
    return cfg


def openclip_config(shapes: Shapes, base: Mapping[str, Any], prefix: str, drop_last: bool) -> dict[str, Any]:
    """CLIPTextConfig kwargs for an OpenCLIP text tower under `prefix`. SD2 drops the last block (`drop_last`):
    it conditions on the penultimate layer, which is how diffusers stores its 23-layer text encoder."""
    c = _sub(shapes, prefix)
    vocab, hidden = _need(c, "token_embedding.weight", "text encoder")
    layers = len(_indices(c, r"transformer\.resblocks\.(\d+)\."))
    cfg = dict(base)
    cfg.update(vocab_size=vocab, hidden_size=hidden,
               max_position_embeddings=_need(c, "positional_embedding", "text encoder")[0],
               num_hidden_layers=layers - 1 if drop_last else layers,
               intermediate_size=_need(c, "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0],
               num_attention_heads=hidden // 64 if hidden % 64 == 0 else 1)
    if "text_projection" in c:
        cfg["projection_dim"] = c["text_projection"][1]
    if cfg["num_hidden_layers"] < 1:
        raise SdtuneError("the text encoder has too few layers; the file is damaged")
    return cfg
