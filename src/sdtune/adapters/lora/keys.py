"""Module names of LoRA files: sdtune's canonical names <-> kohya (A1111/ComfyUI) key names.

Canonical name (what every sdtune LoRA function uses): `<component>.<module path>` where component is `unet`,
`text_encoder` or `text_encoder_2` and the path is the diffusers module path (`down_blocks.1.attentions.0.
transformer_blocks.0.attn2.to_k`). Text-encoder paths always start with `text_model.` (the HF CLIP layout that
kohya and older transformers use), even where the loaded model is a flattened CLIPTextModel.

kohya names replace every `.` by `_` and put a component prefix in front:

* `lora_unet_` UNet. SD1/SD2 files use the diffusers module path (kohya trains SD1/SD2 on a diffusers-style UNet);
  SDXL files use the original (SGM/LDM) path `input_blocks.4.1.transformer_blocks.0.attn1.to_q` because kohya
  trains SDXL on the SGM UNet. Readers here accept both spellings for every family.
* `lora_te_` the text encoder of SD1/SD2; `lora_te1_` / `lora_te2_` SDXL's CLIP-L / OpenCLIP-bigG.

Going from `_` back to `.` is ambiguous, so names are re-tokenised against the list of multi-word names these
models use (`down_blocks`, `to_q`, `self_attn` ...), then checked against the grammar of LoRA-able modules; a
name that does not parse is reported as unknown, never guessed.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable, Mapping

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
SDXL_FAMILIES = ("sdxl", "sdxl-refiner")

# multi-word names (as their `_`-separated parts) that occur in UNet/SGM/CLIP module paths
_COMPOUNDS = {
    tuple(w.split("_")) for w in (
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
        "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding", "add_embedding",
        "linear_1", "linear_2", "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers",
        "emb_layers", "skip_connection", "time_embed", "label_emb", "text_model", "self_attn", "q_proj", "k_proj",
        "v_proj", "out_proj", "text_projection", "final_layer_norm", "conv_norm_out", "layer_norm1", "layer_norm2",
        "token_embedding", "position_embedding")
}
_MAX_PARTS = max(len(c) for c in _COMPOUNDS)

_ATTN_TAIL = (r"(proj_in|proj_out|transformer_blocks\.\d+\."
              r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))")
_RESNET_TAIL = r"(conv1|conv2|time_emb_proj|conv_shortcut)"
UNET_MODULE_RE = re.compile(
    rf"^((down_blocks|up_blocks)\.\d+\.attentions\.\d+\.{_ATTN_TAIL}"
    rf"|mid_block\.attentions\.0\.{_ATTN_TAIL}"
    rf"|(down_blocks|up_blocks)\.\d+\.resnets\.\d+\.{_RESNET_TAIL}"
    rf"|mid_block\.resnets\.\d+\.{_RESNET_TAIL}"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
    r"|conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])$")
TEXT_MODULE_RE = re.compile(r"^(text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
                            r"|text_projection)$")

_RESNET_TO_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}
_RESNET_FROM_SGM = {v: k for k, v in _RESNET_TO_SGM.items()}
_TOP_TO_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2"}
_TOP_FROM_SGM = {v: k for k, v in _TOP_TO_SGM.items()}


def is_lora_module(name: str) -> bool:
    """Whether a canonical name is a module that LoRA files target (attention/FF/resnet/sampler convs, CLIP
    attention and MLP)."""
    component, _, path = name.partition(".")
    if component == "unet":
        return bool(UNET_MODULE_RE.match(path))
    if component in ("text_encoder", "text_encoder_2"):
        return bool(TEXT_MODULE_RE.match(path))
    return False


# ------------------------------------------------------------------ UNet layout (diffusers <-> SGM)


def unet_layout(config: Mapping[str, Any] | None = None, family: str | None = None) -> dict[str, Any]:
    """What the SGM mapping needs from a UNet config: layers per block and which up blocks have attention.
    Without a config, the shipped config of `family` (default SDXL) is used."""
    if config is None:
        from sdtune.models.infer import family_config

        config = family_config(family if family in ("sd1", "sd2", "sdxl", "sdxl-refiner") else "sdxl", "unet")
    return {"layers_per_block": int(config["layers_per_block"]),
            "down_block_types": list(config["down_block_types"]),
            "up_block_types": list(config["up_block_types"])}


def unet_path_to_sgm(path: str, layout: Mapping[str, Any]) -> str:
    """diffusers UNet module path -> SGM (original SDXL) module path."""
    if path in _TOP_TO_SGM:
        return _TOP_TO_SGM[path]
    lpb = int(layout["layers_per_block"])
    up_attn = {i for i, t in enumerate(layout["up_block_types"]) if "CrossAttn" in t}
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path):
        idx = 1 + int(m[1]) * (lpb + 1) + int(m[3])
        if m[2] == "resnets":
            return f"input_blocks.{idx}.0.{_resnet_to_sgm(m[4])}"
        return f"input_blocks.{idx}.1.{m[4]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", path):
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", path):
        return f"middle_block.{2 * int(m[1])}.{_resnet_to_sgm(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)$", path):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path):
        idx = int(m[1]) * (lpb + 1) + int(m[3])
        if m[2] == "resnets":
            return f"output_blocks.{idx}.0.{_resnet_to_sgm(m[4])}"
        return f"output_blocks.{idx}.1.{m[4]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", path):
        b = int(m[1])
        return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in up_attn else 1}.conv"
    raise ValueError(f"no SGM name for UNet module {path!r}")


def _resnet_to_sgm(rest: str) -> str:
    if rest not in _RESNET_TO_SGM:
        raise ValueError(f"no SGM name for resnet module {rest!r}")
    return _RESNET_TO_SGM[rest]


def unet_path_from_sgm(path: str, layout: Mapping[str, Any]) -> str | None:
    """SGM UNet module path -> diffusers path, or None when it is not a module of this layout."""
    if path in _TOP_FROM_SGM:
        return _TOP_FROM_SGM[path]
    lpb = int(layout["layers_per_block"])
    n_down = len(layout["down_block_types"])
    n_up = len(layout["up_block_types"])
    up_attn = {i for i, t in enumerate(layout["up_block_types"]) if "CrossAttn" in t}
    down_attn = {i for i, t in enumerate(layout["down_block_types"]) if "CrossAttn" in t}
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.+)$", path):
        n, k, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            return None
        b, j = divmod(n - 1, lpb + 1)
        if b >= n_down:
            return None
        if j == lpb:
            return f"down_blocks.{b}.downsamplers.0.conv" if (k, rest) == (0, "op") and b < n_down - 1 else None
        if k == 0:
            return f"down_blocks.{b}.resnets.{j}.{_RESNET_FROM_SGM[rest]}" if rest in _RESNET_FROM_SGM else None
        return f"down_blocks.{b}.attentions.{j}.{rest}" if k == 1 and b in down_attn else None
    if m := re.match(r"middle_block\.(\d+)\.(.+)$", path):
        i, rest = int(m[1]), m[2]
        if i in (0, 2):
            return f"mid_block.resnets.{i // 2}.{_RESNET_FROM_SGM[rest]}" if rest in _RESNET_FROM_SGM else None
        return f"mid_block.attentions.0.{rest}" if i == 1 else None
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.+)$", path):
        n, k, rest = int(m[1]), int(m[2]), m[3]
        b, j = divmod(n, lpb + 1)
        if b >= n_up:
            return None
        sampler = (j == lpb and rest == "conv" and b < n_up - 1)
        if k == 0:
            return f"up_blocks.{b}.resnets.{j}.{_RESNET_FROM_SGM[rest]}" if rest in _RESNET_FROM_SGM else None
        if k == 1 and b in up_attn:
            return f"up_blocks.{b}.attentions.{j}.{rest}"
        if sampler and k == (2 if b in up_attn else 1):
            return f"up_blocks.{b}.upsamplers.0.conv"
        return None
    return None


# ------------------------------------------------------------------ kohya names


def _kohya_prefix(component: str, family: str | None) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder_2":
        return "lora_te2_"
    if component == "text_encoder":
        return "lora_te1_" if family in SDXL_FAMILIES else "lora_te_"
    raise ValueError(f"unknown component {component!r}")


def to_kohya(name: str, family: str | None, layout: Mapping[str, Any] | None = None) -> str:
    """Canonical module name -> kohya module name (without `.lora_down.weight`). SDXL UNet modules use SGM paths
    (pass the UNet `layout` for non-standard UNets such as the tiny test models)."""
    component, _, path = name.partition(".")
    if component == "unet" and family in SDXL_FAMILIES:
        path = unet_path_to_sgm(path, layout or unet_layout(family=family))
    return _kohya_prefix(component, family) + path.replace(".", "_")


def _tokens(underscored: str) -> list[str]:
    parts = underscored.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for n in range(min(_MAX_PARTS, len(parts) - i), 0, -1):
            if n == 1 or tuple(parts[i:i + n]) in _COMPOUNDS:
                out.append("_".join(parts[i:i + n]))
                i += n
                break
    return out


def split_kohya_prefix(kohya_name: str) -> tuple[str, str] | None:
    """('unet'|'text_encoder'|'text_encoder_2', rest) for a kohya module name, None for other names."""
    for prefix, component in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                              ("lora_te_", "text_encoder")):
        if kohya_name.startswith(prefix):
            return component, kohya_name[len(prefix):]
    return None


def from_kohya(kohya_name: str, layout: Mapping[str, Any] | None = None, family: str | None = None) -> str | None:
    """kohya module name -> canonical name, or None when it is not a LoRA-able module this code knows.

    SGM-style UNet names (`input_blocks_...`) are mapped with `layout` (the UNet the LoRA was made for; by default
    the shipped config of `family`, else SDXL's)."""
    split = split_kohya_prefix(kohya_name)
    if split is None:
        return None
    component, rest = split
    path = ".".join(_tokens(rest))
    if component == "unet" and re.match(r"(input_blocks|middle_block|output_blocks|out|time_embed|label_emb)\.",
                                        path):
        path = unet_path_from_sgm(path, layout or unet_layout(family=family)) or ""
    name = f"{component}.{path}"
    return name if is_lora_module(name) else None


def uses_sgm_names(kohya_names: Iterable[str]) -> bool:
    return any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k) for k in kohya_names)


# ------------------------------------------------------------------ names inside loaded models


def canonical_path(component: str, component_model: Any, module_path: str) -> str:
    """A module path inside a loaded component -> canonical path: PEFT wrappers stripped, text-encoder paths under
    `text_model.` (flattened CLIPTextModels in recent transformers have no `text_model.` level)."""
    for wrapper in ("base_model.model.",):
        if module_path.startswith(wrapper):
            module_path = module_path[len(wrapper):]
    if component != "unet" and not module_path.startswith(("text_model.", "text_projection")):
        module_path = "text_model." + module_path
    return module_path


@lru_cache(maxsize=8)
def _meta_unet_modules(family: str) -> tuple[str, ...]:
    import torch
    from diffusers import UNet2DConditionModel

    from sdtune.models.infer import family_config

    cfg = {k: v for k, v in family_config(family, "unet").items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    return tuple(n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def family_module_names(family: str) -> list[str]:
    """Canonical names of every Linear/Conv2d UNet module of a real model of `family` (from the shipped config,
    built on the meta device, no weights)."""
    return [f"unet.{n}" for n in _meta_unet_modules(family)]
