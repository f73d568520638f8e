"""Write diffusers components as one original-layout (LDM / A1111) .safetensors checkpoint.

This is the inverse of the single-file loader: the key mapping is derived from the LDM UNet/VAE/CLIP structure,
and every file is checked by converting it back with diffusers' own converters before it is written. The exact
diffusers configs (and a non-standard tokenizer, e.g. `tiny`'s) go into the safetensors metadata so that
`load_model` rebuilds the very same model; A1111 and other tools ignore that metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from sdtune.errors import SdtuneError
from sdtune.formats.safe_io import save_safetensors_atomic

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base",
                   "sdxl-refiner": "stable-diffusion-xl-v1-refiner"}
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "attention_dropout", "projection_dim",
              "bos_token_id", "eos_token_id", "pad_token_id")


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET.get(name, name)}.{tail}"


def unet_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM `model.diffusion_model.*` keys (without the prefix)."""
    lpb = int(config["layers_per_block"])
    up_attn = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        new = None
        for old, rep in _TOP.items():
            if key.startswith(old):
                new = rep + key[len(old):]
        if new is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + b * (lpb + 1) + j
            new = f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif new is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)):
            new = f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
        elif new is None and (m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif new is None and (m := re.match(r"mid_block\.attentions\.0\.(.*)", key)):
            new = f"middle_block.1.{m[1]}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = b * (lpb + 1) + j
            new = f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)):
            b = int(m[1])
            new = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in up_attn else 1}.conv.{m[2]}"
        if new is None:
            raise SdtuneError(f"cannot save UNet weight {key!r} in the original layout (unsupported UNet variant)")
        out[new] = v
    return out


def vae_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM VAE keys (`encoder.down.0.block.0...`, no prefix)."""
    n_up = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        k = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            k = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", k):
            k = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            k = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k):
            k = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k):
            k = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", k):
            k = f"{m[1]}.mid.attn_1.{attn.get(m[2], m[2])}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm" and v.ndim == 2:
                v = v[:, :, None, None]  # LDM uses 1x1 convs where diffusers uses linear layers
        out[k] = v
    return out


def hf_clip_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text state dict with every text-model key under `text_model.` (as in A1111 files)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def openclip_from_hf(sd: Mapping[str, torch.Tensor], pad_final_block: bool = False) -> dict[str, torch.Tensor]:
    """transformers CLIP text state dict -> OpenCLIP text tower keys (`transformer.resblocks.N...`, no prefix).

    `pad_final_block` (SD2): diffusers stores SD2's text encoder without its last block because SD2 conditions on
    the penultimate layer; an identity block (zero output projections) is appended so the file has the full depth
    that A1111 and our loader expect, without changing the penultimate output."""
    sd = hf_clip_keys(sd)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for key, v in sd.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = v
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m[1]}.{names.get(m[2], m[2])}.{m[3]}"] = v
        else:
            raise SdtuneError(f"cannot save text encoder weight {key!r} in the OpenCLIP layout")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if pad_final_block:
        n = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks."))
        src = f"transformer.resblocks.{n - 1}."
        for k, v in [(k, v) for k, v in out.items() if k.startswith(src)]:
            name = k[len(src):]
            keep_ones = name in ("ln_1.weight", "ln_2.weight")
            out[f"transformer.resblocks.{n}.{name}"] = torch.ones_like(v) if keep_ones else torch.zeros_like(v)
        if "text_projection" not in out:
            width = out["token_embedding.weight"].shape[1]
            out["text_projection"] = torch.eye(width, dtype=out["token_embedding.weight"].dtype)
    return out


def _components(pipe_or_components: Any) -> dict[str, Any]:
    comps = getattr(pipe_or_components, "components", pipe_or_components)
    if not isinstance(comps, Mapping) or "unet" not in comps or "vae" not in comps:
        raise SdtuneError("save_single_file needs a pipeline or a dict with at least unet and vae")
    return dict(comps)


def _guess_family(c: Mapping[str, Any]) -> str:
    from sdtune.models.family import family_of_components

    return family_of_components(c) or "sd1"


def _tokenizer_spec(tok: Any, default_pad: str) -> str | None:
    """JSON of a tokenizer's vocab/merges/special tokens, or None when it is the standard CLIP tokenizer."""
    from sdtune.models.tokenizer import clip_vocab_and_merges

    vocab = tok.get_vocab()
    std_vocab, _ = clip_vocab_and_merges()
    if vocab == std_vocab and tok.pad_token == default_pad:
        return None
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token,
               "pad_token": tok.pad_token, "model_max_length": int(tok.model_max_length)}
    return json.dumps({"vocab": vocab, "merges": merges, "special": special}, ensure_ascii=False)


def _text_config(model: Any) -> dict[str, Any]:
    cfg = model.config.to_dict()
    return {k: cfg[k] for k in _TEXT_KEYS if k in cfg}


def _self_check(ldm: Mapping[str, torch.Tensor], unet_sd: Mapping[str, torch.Tensor],
                vae_sd: Mapping[str, torch.Tensor], unet_cfg: Mapping[str, Any], vae_cfg: Mapping[str, Any]) -> None:
    """Convert back with diffusers' converters and require the same keys and shapes, so a wrong mapping can never
    produce a file that silently loads broken."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for name, back, orig in (("UNet", convert_ldm_unet_checkpoint(dict(ldm), dict(unet_cfg)), unet_sd),
                             ("VAE", convert_ldm_vae_checkpoint(dict(ldm), dict(vae_cfg)), vae_sd)):
        diff = set(back) ^ set(orig)
        bad = [k for k in set(back) & set(orig) if tuple(back[k].shape) != tuple(orig[k].shape)]
        if diff or bad:
            raise RuntimeError(f"sdtune bug: {name} single-file conversion does not round-trip "
                               f"({sorted(diff)[:3]} {bad[:3]})")


def save_single_file(pipe_or_components: Any, path: str | Path, family: str | None = None, *,
                     dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Save a pipeline (or {unet, vae, text_encoder[, text_encoder_2], tokenizer[_2], scheduler}) as one
    original-layout .safetensors checkpoint that A1111/ComfyUI and `load_model` can load. Atomic write.

    family: "sd1" | "sd2" | "sdxl" | "sdxl-refiner" (guessed from the components when None);
    dtype: cast floating-point weights (e.g. torch.float16 halves the file)."""
    c = _components(pipe_or_components)
    family = family or _guess_family(c)
    if family not in _MODELSPEC_ARCH:
        raise SdtuneError(f"unknown family {family!r}; use one of {', '.join(_MODELSPEC_ARCH)}")
    out_path = Path(path)
    if out_path.suffix.lower() != ".safetensors":
        raise SdtuneError(f"{out_path.name}: single-file checkpoints are written as .safetensors only")
    unet, vae = c["unet"], c["vae"]
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    unet_cfg, vae_cfg = dict(unet.config), dict(vae.config)
    ldm: dict[str, torch.Tensor] = {}
    ldm.update({"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet_sd, unet_cfg).items()})
    ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae_sd).items()})
    configs: dict[str, Any] = {"unet": unet_cfg, "vae": vae_cfg}
    meta: dict[str, str] = {}
    te, te2 = c.get("text_encoder"), c.get("text_encoder_2")
    needs = {"sd1": (True, False), "sd2": (True, False), "sdxl": (True, True), "sdxl-refiner": (False, True)}[family]
    if (needs[0] and te is None) or (needs[1] and te2 is None):
        missing = "text_encoder" if needs[0] and te is None else "text_encoder_2"
        raise SdtuneError(f"a {family} checkpoint needs {missing}; pass the full pipeline")
    # the check above: te is set for sd1/sd2/sdxl, te2 for sdxl/sdxl-refiner
    if family == "sd1":
        assert te is not None
        ldm.update({"cond_stage_model.transformer." + k: v for k, v in hf_clip_keys(te.state_dict()).items()})
    elif family == "sd2":
        assert te is not None
        ldm.update({"cond_stage_model.model." + k: v
                    for k, v in openclip_from_hf(te.state_dict(), pad_final_block=True).items()})
    elif family == "sdxl":
        assert te is not None and te2 is not None
        ldm.update({"conditioner.embedders.0.transformer." + k: v for k, v in hf_clip_keys(te.state_dict()).items()})
        ldm.update({"conditioner.embedders.1.model." + k: v for k, v in openclip_from_hf(te2.state_dict()).items()})
    else:
        assert te2 is not None
        ldm.update({"conditioner.embedders.0.model." + k: v for k, v in openclip_from_hf(te2.state_dict()).items()})
    if needs[0]:
        configs["text_encoder"] = _text_config(te)
        tok = c.get("tokenizer")
        spec = _tokenizer_spec(tok, "!" if family == "sd2" else "<|endoftext|>") if tok is not None else None
        if spec:
            meta["sdtune.tokenizer"] = spec
    if needs[1]:
        configs["text_encoder_2"] = _text_config(te2)
        tok2 = c.get("tokenizer_2")
        spec2 = _tokenizer_spec(tok2, "!") if tok2 is not None else None
        if spec2:
            meta["sdtune.tokenizer_2"] = spec2
    scheduler = c.get("scheduler")
    pred = "epsilon"
    if scheduler is not None:
        configs["scheduler"] = dict(scheduler.config) | {"_class_name": type(scheduler).__name__}
        pred = scheduler.config.get("prediction_type", "epsilon")
    if pred == "v_prediction" and family.startswith("sdxl"):
        ldm["v_pred"] = torch.zeros(0)  # marker other SDXL tools read (SD2 tools use the modelspec/yaml instead)
    if scheduler is not None and scheduler.config.get("rescale_betas_zero_snr"):
        ldm["ztsnr"] = torch.zeros(0)
    _self_check(ldm, unet_sd, vae_sd, unet_cfg, vae_cfg)
    if dtype is not None:
        ldm = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in ldm.items()}
    meta.update({
        "sdtune.config": json.dumps(configs, default=list),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _MODELSPEC_ARCH[family] + ("-v" if family == "sd2" and pred == "v_prediction"
                                                              else ""),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family.startswith("sdxl")
        else "diffusers",
        "modelspec.title": out_path.stem,
        "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
    })
    meta.update(metadata or {})
    return save_safetensors_atomic(ldm, out_path, meta)
