"""Conformance: single-file checkpoints sdtune writes (DreamBooth's final file, `sdtune merge --out X.safetensors`;
both go through `formats.checkpoint.save_single_file`) against each tool's documented loading rule, per family.

The full-size SD1.5 / SD2.1 / SDXL base / SDXL refiner models are built on the meta device from the shipped configs
(`src/sdtune/models/configs`), so the writer sees the real layer names and shapes at no memory cost; the dict it
would write is taken where it reaches `save_safetensors_atomic`. The rules below are stated as data, in our own
words, with the tool file and function they come from; the checker functions apply them to our dict.

Sources (read for this test; no code copied):
- A1111 = AUTOMATIC1111/stable-diffusion-webui v1.10: modules/sd_models_config.py guess_model_config_from_state_dict,
  modules/sd_models.py get_state_dict_from_checkpoint / set_model_type / load_model_weights (strict=False).
- ComfyUI = Comfy-Org/ComfyUI (master, 2026): comfy/model_detection.py detect_unet_config, comfy/supported_models.py
  SD15 / SD20 / SDXL / SDXLRefiner (unet_config, model_type, process_clip_state_dict), comfy/utils.py
  clip_text_transformers_convert (OpenCLIP names), comfy/sd.py (VAE under first_stage_model.).
- kohya = kohya-ss/sd-scripts 48d368f: library/model_util.py load_models_from_stable_diffusion_checkpoint and
  convert_ldm_clip_checkpoint_v2, library/sdxl_model_util.py load_models_from_sdxl_checkpoint (strict loads; the
  family is the user's --v2 / sdxl script choice, never detected). scripts/interop_kohya_check.py runs kohya's own
  loaders on these dicts (meta tensors) when a sd-scripts checkout is at hand.
- diffusers: tests/test_single_file_diffusers.py runs diffusers' own from_single_file on written files.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

Shapes = dict[str, tuple[int, ...]]
UNET = "model.diffusion_model."
VAE = "first_stage_model."

# ---------------------------------------------------------------------------------------------------- A1111
# guess_model_config_from_state_dict: the first of these keys present decides the config (order matters)
A1111_CONFIG_KEYS = [
    ("conditioner.embedders.1.model.ln_final.weight", None, "sdxl"),
    ("conditioner.embedders.0.model.ln_final.weight", None, "sdxl-refiner"),
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (1, 1024), "sd2"),  # shape[1] == 1024
]
A1111_DEFAULT = "sd1"  # v1-inference.yaml when nothing above matches and input_blocks.0.0 has 4 input channels
# get_state_dict_from_checkpoint: a file whose conditioner.embedders.0.model.ln_final.weight has 1024 entries is
# taken for SD2-Turbo and its conditioner.embedders.0. keys renamed to cond_stage_model.
A1111_SD2_TURBO_TRAP = ("conditioner.embedders.0.model.ln_final.weight", 1024)
# set_model_type: an SDXL file without this key is taken for SSD-1B (a pruned SDXL)
A1111_SDXL_NOT_SSD = UNET + "middle_block.1.transformer_blocks.0.attn1.to_q.weight"
# the modules the config builds and the prefixes their weights are read from (strict=False: a key not in the file
# silently keeps its random init, so the file must hold every one)
TEXT_PREFIXES = {
    "sd1": {"cond_stage_model.transformer.text_model.": ("hf", 12, 768)},
    "sd2": {"cond_stage_model.model.": ("openclip", 24, 1024)},
    "sdxl": {"conditioner.embedders.0.transformer.text_model.": ("hf", 12, 768),
             "conditioner.embedders.1.model.": ("openclip", 32, 1280)},
    "sdxl-refiner": {"conditioner.embedders.0.model.": ("openclip", 32, 1280)},
}
# A1111 1.10 reads no file metadata for the prediction type: SD2 v is found by running the UNet on a test input
# (is_using_v_parameterization_for_sd2), SDXL v-prediction needs a <name>.yaml beside the file.

# ---------------------------------------------------------------------------------------------------- ComfyUI
# supported_models.*.unet_config: every listed value must equal the one detect_unet_config reads from the UNet
COMFY_MODELS = {
    "sd1": {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False, "adm_in_channels": None},
    "sd2": {"context_dim": 1024, "model_channels": 320, "use_linear_in_transformer": True, "adm_in_channels": None},
    "sdxl": {"model_channels": 320, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 10, 10],
             "context_dim": 2048, "adm_in_channels": 2816},
    "sdxl-refiner": {"model_channels": 384, "use_linear_in_transformer": True, "context_dim": 1280,
                     "adm_in_channels": 2560, "transformer_depth": [0, 0, 4, 4, 4, 4, 0, 0]},
}
# process_clip_state_dict: the prefixes each model's text encoders are taken from (filter_keys: the rest is dropped)
COMFY_CLIP_PREFIXES = {
    "sd1": ["cond_stage_model.transformer.text_model."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.text_model", "conditioner.embedders.1.model."],
    "sdxl-refiner": ["conditioner.embedders.0.model."],
}
# SDXL.model_type: these (empty) keys make an SDXL file v-prediction / zero-terminal-SNR; SD20.model_type decides
# v for SD2 from the spread of output_blocks.11.1.transformer_blocks.0.norm1.bias (weights, not metadata)
COMFY_SDXL_V_KEYS = ("v_pred", "ztsnr")
# utils.clip_text_transformers_convert: the OpenCLIP names it converts (per block, then the top-level ones)
OPENCLIP_BLOCK = {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                  "attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias"}
OPENCLIP_TOP = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                "text_projection"}

# ---------------------------------------------------------------------------------------------------- kohya
# the prefixes kohya's loaders split a file by; SD2: resblocks.23 is dropped (23 layers used) and any resblock
# key other than ln_*, mlp.*, attn.out_proj, attn.in_proj_* raises "unexpected key in SD"
KOHYA_PREFIXES = {
    "sd1": [UNET, VAE, "cond_stage_model.transformer."],
    "sd2": [UNET, VAE, "cond_stage_model.model."],
    "sdxl": [UNET, VAE, "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}
KOHYA_RESBLOCK_PARTS = re.compile(r"\.resblocks\.\d+\.(ln_\d|mlp\.c_fc|mlp\.c_proj|attn\.out_proj|attn\.in_proj_)")


def a1111_config(shapes: Shapes) -> str:
    """The config A1111 picks for a state dict (see A1111_CONFIG_KEYS)."""
    for key, shape_rule, family in A1111_CONFIG_KEYS:
        if key in shapes and (shape_rule is None or shapes[key][shape_rule[0]] == shape_rule[1]):
            return family
    return A1111_DEFAULT if shapes[UNET + "input_blocks.0.0.weight"][1] == 4 else "other"


def comfy_unet_config(shapes: Shapes) -> dict[str, Any]:
    """What ComfyUI's detect_unet_config reads from the UNet keys: channels from input_blocks.0.0, ADM width from
    label_emb.0.0, and per input block that is not a downsampler (`N.0.op`) its transformer depth, context width
    (attn2.to_k input) and whether proj_in is linear."""
    cfg: dict[str, Any] = {"model_channels": shapes[UNET + "input_blocks.0.0.weight"][0],
                           "adm_in_channels": shapes.get(UNET + "label_emb.0.0.weight", (None, None))[1]}
    depths, n = [], 1
    while any(k.startswith(f"{UNET}input_blocks.{n}.") for k in shapes):
        p = f"{UNET}input_blocks.{n}."
        if p + "0.op.weight" not in shapes:
            depth = 0
            while any(k.startswith(f"{p}1.transformer_blocks.{depth}.") for k in shapes):
                depth += 1
            depths.append(depth)
            if depth:
                cfg["context_dim"] = shapes[p + "1.transformer_blocks.0.attn2.to_k.weight"][1]
                cfg["use_linear_in_transformer"] = len(shapes[p + "1.proj_in.weight"]) == 2
        n += 1
    cfg["transformer_depth"] = depths
    return cfg


def comfy_model(shapes: Shapes) -> str | None:
    cfg = comfy_unet_config(shapes)
    found = [name for name, want in COMFY_MODELS.items() if all(cfg.get(k) == v for k, v in want.items())]
    return found[0] if len(found) == 1 else None


def text_layout_problems(shapes: Shapes, prefix: str, kind: str, depth: int, width: int) -> list[str]:
    """Keys missing or misshapen for a text encoder of `kind` (hf CLIP or OpenCLIP names) at `prefix`."""
    if kind == "hf":
        want = {f"{prefix}embeddings.token_embedding.weight": (49408, width),
                f"{prefix}embeddings.position_embedding.weight": (77, width),
                f"{prefix}final_layer_norm.weight": (width,)}
        want |= {f"{prefix}encoder.layers.{i}.{n}.weight": (width, width) for i in range(depth)
                 for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")}
    else:
        want = {f"{prefix}token_embedding.weight": (49408, width), f"{prefix}positional_embedding": (77, width),
                f"{prefix}ln_final.weight": (width,), f"{prefix}text_projection": (width, None)}
        want |= {f"{prefix}transformer.resblocks.{i}.{n}": None for i in range(depth) for n in OPENCLIP_BLOCK}
        want |= {f"{prefix}transformer.resblocks.{i}.attn.in_proj_weight": (3 * width, width) for i in range(depth)}
    bad = [k for k in want if k not in shapes]
    bad += [f"{k} {shapes[k]}" for k, s in want.items() if k in shapes and s is not None
            and any(a is not None and a != b for a, b in zip(s, shapes[k]))]
    extra_blocks = [k for k in shapes if k.startswith(f"{prefix}transformer.resblocks.{depth}.")
                    or k.startswith(f"{prefix}encoder.layers.{depth}.")]
    return bad + [f"unexpected {k}" for k in extra_blocks[:1]]


# ---------------------------------------------------------------------------------------------------- writing


def meta_components(family: str, prediction: str | None = None) -> dict[str, Any]:
    """The family's full-size components on the meta device, from the shipped configs."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.models import infer

    comps: dict[str, Any] = {}
    with torch.device("meta"):
        comps["unet"] = diffusers.UNet2DConditionModel.from_config(infer.family_config(family, "unet"))
        comps["vae"] = diffusers.AutoencoderKL.from_config(infer.family_config(family, "vae"))
        for c in ("text_encoder", "text_encoder_2"):
            if (infer.configs_dir(family) / c).is_dir():
                cfg = {k: v for k, v in infer.family_config(family, c).items() if k != "architectures"}
                comps[c] = (CLIPTextModelWithProjection if c.endswith("2") else CLIPTextModel)(CLIPTextConfig(**cfg))
    sched = json.loads((infer.configs_dir(family) / "scheduler" / "scheduler_config.json").read_text())
    if prediction:
        sched["prediction_type"] = prediction
    comps["scheduler"] = getattr(diffusers, sched["_class_name"]).from_config(sched)
    return comps


def written(family: str, monkeypatch, prediction: str | None = None, **kw) -> tuple[Shapes, dict[str, str]]:
    """(names -> shapes, metadata) of the file `save_single_file` writes for the full-size `family`."""
    import sdtune.formats.checkpoint as ck

    got: dict[str, Any] = {}
    monkeypatch.setattr(ck, "save_safetensors_atomic", lambda t, p, m: got.update(t=t, m=m) or p)
    ck.save_single_file(meta_components(family, prediction), "/nonexistent/model.safetensors", family, **kw)
    return {k: tuple(v.shape) for k, v in got["t"].items()}, got["m"]


FAMILIES = ["sd1", "sd2", "sdxl", "sdxl-refiner"]


@pytest.fixture(scope="module")
def files():
    out = {}
    for f in FAMILIES:
        with pytest.MonkeyPatch.context() as mp:  # the writer's saver is replaced only while it writes
            out[f] = written(f, mp)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a1111_picks_the_right_config_and_finds_every_text_encoder(files, family):
    shapes, _ = files[family]
    assert a1111_config(shapes) == family
    key, size = A1111_SD2_TURBO_TRAP
    assert shapes.get(key, (None,))[0] != size  # not renamed as an SD2-Turbo file
    if family.startswith("sdxl"):
        assert A1111_SDXL_NOT_SSD in shapes
    for prefix, (kind, depth, width) in TEXT_PREFIXES[family].items():
        assert text_layout_problems(shapes, prefix, kind, depth, width) == [], prefix
    assert UNET + "out.2.weight" in shapes and VAE + "decoder.conv_in.weight" in shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_detects_the_model_and_its_clip_and_vae(files, family):
    shapes, meta = files[family]
    assert comfy_model(shapes) == family, comfy_unet_config(shapes)
    for prefix in COMFY_CLIP_PREFIXES[family]:
        assert any(k.startswith(prefix) for k in shapes), prefix
    for prefix, (kind, depth, width) in TEXT_PREFIXES[family].items():
        if kind == "openclip":  # every block name is one ComfyUI converts
            names = {k[len(prefix):] for k in shapes if k.startswith(prefix)}
            blocks = {re.sub(r"^transformer\.resblocks\.\d+\.", "", n) for n in names if n.startswith("transformer.")}
            assert blocks == OPENCLIP_BLOCK and names - {n for n in names if n.startswith("transformer.")} \
                == OPENCLIP_TOP
    # the VAE in the LDM layout ComfyUI builds by default (1x1 conv attention, no diffusers up_blocks names)
    assert len(shapes[VAE + "decoder.mid.attn_1.q.weight"]) == 4
    assert not any(k.startswith(VAE + "decoder.up_blocks.") for k in shapes)
    assert not any(k in shapes for k in COMFY_SDXL_V_KEYS)  # epsilon models carry no v marker


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_finds_every_part_under_its_prefixes(files, family):
    shapes, _ = files[family]
    for prefix in KOHYA_PREFIXES[family]:
        assert any(k.startswith(prefix) for k in shapes), prefix
    known = tuple(KOHYA_PREFIXES[family])
    assert [k for k in shapes if not k.startswith(known)] == []  # nothing kohya would not know where to put
    for k in shapes:
        if ".resblocks." in k:
            assert KOHYA_RESBLOCK_PARTS.search(k), f"kohya raises 'unexpected key in SD' on {k}"


def test_v_prediction_markers_the_tools_read(monkeypatch):
    """SDXL v: ComfyUI reads the empty `v_pred` key (and `ztsnr`); A1111 1.10 reads neither (a .yaml beside the
    file is its way). SD2 v: A1111 and ComfyUI decide from the weights; the file says it in modelspec too."""
    shapes, meta = written("sdxl", monkeypatch, prediction="v_prediction")
    assert shapes["v_pred"] == (0,) and "ztsnr" not in shapes and meta["modelspec.prediction_type"] == "v"
    shapes, meta = written("sd2", monkeypatch)  # the shipped SD2.1 config is the 768-v model
    assert "v_pred" not in shapes and meta["modelspec.architecture"] == "stable-diffusion-v2-v"


def test_fp16_files_keep_names_and_shapes(files, monkeypatch):
    """DreamBooth's --save-precision fp16 / merge --save-dtype fp16: only the dtype changes."""
    shapes, _ = written("sd1", monkeypatch, dtype=torch.float16)
    assert shapes == files["sd1"][0]


def test_the_checkers_refuse_what_the_tools_refuse(files):
    """The rules catch the mistakes they exist for: a missing text encoder block, a UNet whose context width
    fits no model ComfyUI knows, an SDXL file without its second text encoder."""
    shapes = dict(files["sd2"][0])
    shapes.pop("cond_stage_model.model.transformer.resblocks.23.ln_1.weight")
    assert text_layout_problems(shapes, "cond_stage_model.model.", "openclip", 24, 1024)
    sd1 = dict(files["sd1"][0])
    sd1.update({k: (v[0], 1024) for k, v in sd1.items() if k.endswith("attn2.to_k.weight")})  # an SD2 UNet width
    assert comfy_model(sd1) is None
    xl = dict(files["sdxl"][0])
    del xl["conditioner.embedders.1.model.ln_final.weight"]
    assert a1111_config(xl) != "sdxl"


def test_merge_and_dreambooth_write_through_the_checked_writer(tmp_path, monkeypatch):
    """`merge` calls `save_single_file` (the writer checked above; DreamBooth's `save` does too) with the model's
    family, and the file on disk keeps the family's prefixes."""
    import sdtune.formats.checkpoint as ck
    from safetensors import safe_open

    from sdtune.cli.merge import run_merge
    from sdtune.models.testing import save_tiny_pipeline

    calls: list[str] = []
    real = ck.save_single_file
    monkeypatch.setattr(ck, "save_single_file", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    model = tmp_path / "model"
    pipe = save_tiny_pipeline(model, "sdxl")
    from sdtune.adapters.lora.io import save_lora
    from sdtune.adapters.lora.testing import random_network

    lora = save_lora(random_network(pipe), tmp_path / "l.safetensors")
    out = run_merge(str(model), [str(lora)], tmp_path / "merged.safetensors")
    assert calls == ["sdxl"]
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    for prefix in KOHYA_PREFIXES["sdxl"]:
        assert any(k.startswith(prefix) for k in keys)
    assert "conditioner.embedders.1.model.ln_final.weight" in keys
