"""sdtune.models: device/dtype, family detection, tokenizer, loading folders / single files, the single-file
round trip for every family, prediction-type rules and VAE swaps. All models are tiny and random."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtune.errors import SdtuneError
from sdtune.formats.checkpoint import save_single_file
from sdtune.models import detect_family, load_model, resolve_device_dtype
from sdtune.models.testing import tiny_pipeline, unet_inputs

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl-refiner"]
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (source pipeline, single-file checkpoint written by save_single_file)."""
    out = tmp_path_factory.mktemp("single")
    made = {}
    for fam in FAMILIES:
        pipe = tiny_pipeline(fam, seed=1)
        made[fam] = (pipe, save_single_file(pipe, out / f"{fam}.safetensors", fam))
    return made


def _unet_out(unet, like=None, **kw):
    """UNet output on fixed inputs shaped for `like` (sample_size is not stored in the weights)."""
    with torch.no_grad():
        return unet(**unet_inputs(like or unet, **kw)).sample


# ------------------------------------------------------------------ device / dtype


@pytest.mark.parametrize("device,dtype,expected", [
    (None, None, ("cpu", torch.float32)), ("cpu", "auto", ("cpu", torch.float32)),
    ("cpu", "fp32", ("cpu", torch.float32)), ("cpu", "bf16", ("cpu", torch.bfloat16)),
    ("cpu", "float32", ("cpu", torch.float32)),
])
def test_resolve_device_dtype(device, dtype, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev, dt = resolve_device_dtype(device, dtype)
    assert (dev.type, dt) == expected


@pytest.mark.parametrize("device,dtype,words", [
    ("cpu", "fp16", "not supported on cpu"), ("cpu", "int8", "unknown dtype"), ("tpu", None, "unknown device"),
    ("cuda", None, "cuda is not available"), ("cuda:3", "fp16", "cuda is not available"),
])
def test_resolve_device_dtype_errors(device, dtype, words, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SdtuneError) as err:
        resolve_device_dtype(device, dtype)
    assert words in str(err.value).lower()


def test_auto_prefers_cuda_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_dtype() == (torch.device("cuda"), torch.float16)


# ------------------------------------------------------------------ family detection and tokenizer


def _keys(*names, ctx=None, label=False):
    d = {n: (4, 4) for n in names}
    if ctx:
        d["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, ctx)
    if label:
        d["model.diffusion_model.label_emb.0.0.weight"] = (1280, 2816)
    return d


U = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("keys,family", [
    (_keys(U, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"), "sd1"),
    (_keys(U, "cond_stage_model.transformer.embeddings.token_embedding.weight"), "sd1"),
    (_keys(U, "cond_stage_model.model.token_embedding.weight"), "sd2"),
    (_keys(U, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
           "conditioner.embedders.1.model.ln_final.weight"), "sdxl"),
    (_keys(U, "conditioner.embedders.0.model.ln_final.weight"), "sdxl-refiner"),
    (_keys(U, ctx=768), "sd1"), (_keys(U, ctx=1024), "sd2"), (_keys(U, ctx=2048, label=True), "sdxl"),
    (_keys(U, ctx=1280, label=True), "sdxl-refiner"),
    (list(_keys(U, "cond_stage_model.model.token_embedding.weight")), "sd2"),  # bare keys work too
])
def test_detect_family(keys, family):
    assert detect_family(keys) == family


@pytest.mark.parametrize("keys", [{}, _keys("lora_unet_x.lora_down.weight"), _keys(U, ctx=512)])
def test_detect_family_unknown(keys):
    with pytest.raises(SdtuneError, match="not a Stable Diffusion"):
        detect_family(keys)


def test_clip_tokenizer_matches_openai():
    from sdtune.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.pad_token_id == 49407
    sd2 = clip_tokenizer(pad_token="!")
    assert sd2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


# ------------------------------------------------------------------ loading


def test_load_folder(tmp_path):
    folder = tmp_path / "My Model"
    tiny_pipeline("sd1").save_pretrained(folder)
    m = load_model(folder)
    assert (m.family, m.prediction_type, m.name, m.source) == ("sd1", "epsilon", "My Model", folder)
    assert type(m.pipe).__name__ == "StableDiffusionPipeline" and m.pipe.safety_checker is None
    assert len(m.hash) == 10 and int(m.hash, 16) >= 0 and (m.device, m.dtype) == (torch.device("cpu"), torch.float32)
    assert load_model(str(folder), prediction_type="v").prediction_type == "v_prediction"
    assert load_model(folder).hash == m.hash  # stable


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_family(tmp_path, family):
    from sdtune.models.loading import folder_family

    pipe = tiny_pipeline(family)
    pipe.save_pretrained(tmp_path / family)
    assert folder_family(tmp_path / family) == (family, pipe.scheduler.config.prediction_type)
    if family == "sdxl-refiner":  # no safety checker arguments for XL pipelines; text_encoder stays None
        m = load_model(tmp_path / family)
        assert type(m.pipe).__name__ == PIPELINES[family] and m.pipe.text_encoder is None


def test_load_tiny_missing_is_clear(monkeypatch, tmp_path):
    import sdtune.models.bundled as bundled

    monkeypatch.setattr(bundled, "assets_folder", lambda: tmp_path / "assets")
    for spec in (None, "tiny", "TINY"):
        with pytest.raises(SdtuneError, match="bundled tiny model is missing"):
            load_model(spec)


@pytest.mark.parametrize("spec,words", [("does/not-exist", "never downloads"), ("./nothing.safetensors", "not found")])
def test_load_model_bad_spec(spec, words):
    with pytest.raises(SdtuneError, match=words):
        load_model(spec)


def test_load_non_model_folder(tmp_path):
    with pytest.raises(SdtuneError, match="not a diffusers pipeline folder"):
        load_model(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip(exported, family, tmp_path):
    """diffusers -> single file -> load_model gives the same UNet outputs, with and without sdtune metadata
    (the latter exercises config inference from the weights alone)."""
    pipe, path = exported[family]
    assert detect_family(load_file(str(path))) == family
    expected = _unet_out(pipe.unet)
    bare = tmp_path / f"{family}-bare.safetensors"
    save_file(load_file(str(path)), str(bare))  # same tensors, no metadata
    for source in (path, bare):
        m = load_model(source)
        assert (m.family, type(m.pipe).__name__) == (family, PIPELINES[family])
        assert torch.equal(_unet_out(m.pipe.unet, pipe.unet), expected), source.name
        assert m.hash == hashlib.sha256(source.read_bytes()).hexdigest()[:10]
        for name in ("text_encoder", "text_encoder_2"):
            ref, got = getattr(pipe, name, None), getattr(m.pipe, name, None)
            assert (ref is None) == (got is None)
            if ref is not None:
                ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
                with torch.no_grad():
                    a = ref(ids, output_hidden_states=True).hidden_states[-2]
                    b = got(ids, output_hidden_states=True).hidden_states[-2]
                assert torch.equal(a, b), name
        assert torch.equal(m.pipe.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    if family.startswith("sdxl"):
        assert m.pipe.vae.config.force_upcast  # fp16 SDXL decodes in fp32 (no black images)


def test_single_file_keys_are_original_layout(exported):
    sd = load_file(str(exported["sd1"][1]))
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.encoder.down.0.block.0.conv1.weight",
                "first_stage_model.decoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in sd, key
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    sd2 = load_file(str(exported["sd2"][1]))
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in sd2  # 2 layers + identity pad
    xl = load_file(str(exported["sdxl"][1]))
    assert xl["conditioner.embedders.1.model.text_projection"].shape == (64, 64)
    assert "model.diffusion_model.label_emb.0.0.weight" in xl


def test_toy_architecture_round_trip(tmp_path):
    """The tiny toy model (own vocabulary, 2 heads, GroupNorm 8/16) survives export via the embedded configs."""
    from diffusers import StableDiffusionPipeline

    from sdtune.toy.tiny import build_components, write_tokenizer

    write_tokenizer(tmp_path / "tok")
    comps = build_components(seed=0, tokenizer_dir=tmp_path / "tok")
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = save_single_file(pipe, tmp_path / "toy.safetensors", "sd1")
    m = load_model(path)
    assert torch.equal(_unet_out(m.pipe.unet, pipe.unet, batch=2), _unet_out(pipe.unet, batch=2))
    assert m.pipe.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    assert len(m.pipe.tokenizer) == len(pipe.tokenizer) != 49408


def test_ckpt_single_file_and_fp16_file(exported, tmp_path):
    pipe, path = exported["sd1"]
    sd = load_file(str(path))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"global_step": 10, "state_dict": sd}, ckpt)
    m = load_model(ckpt)
    assert m.family == "sd1" and torch.equal(_unet_out(m.pipe.unet, pipe.unet), _unet_out(pipe.unet))
    half = save_single_file(pipe, tmp_path / "half.safetensors", "sd1", dtype=torch.float16)
    assert half.stat().st_size < path.stat().st_size * 0.6
    m16 = load_model(half, dtype="fp32")
    assert m16.pipe.unet.dtype == torch.float32
    assert torch.allclose(_unet_out(m16.pipe.unet, pipe.unet), _unet_out(pipe.unet), atol=2e-2)


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused(tmp_path):
    evil = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.w": torch.zeros(1)}, "x": _Boom(tmp_path / "PWNED")}, evil)
    with pytest.raises(SdtuneError, match="refusing"):
        load_model(evil)
    assert not (tmp_path / "PWNED").exists()


def test_unet_only_and_damaged_files(exported, tmp_path):
    sd = load_file(str(exported["sd1"][1]))
    unet_only = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    with pytest.raises(SdtuneError, match="no VAE weights"):
        load_model(tmp_path / "unet.safetensors")
    damaged = {k: v for k, v in sd.items() if "output_blocks.1." not in k}
    save_file(damaged, str(tmp_path / "damaged.safetensors"))
    with pytest.raises(SdtuneError, match="UNet weights do not fit"):
        load_model(tmp_path / "damaged.safetensors")


# ------------------------------------------------------------------ prediction type rules (SD2)


@pytest.mark.parametrize("name,sidecar,override,expected", [
    ("sd2-model", None, None, ("v_prediction", 96)),
    ("v2-1_512-ema-pruned", None, None, ("epsilon", 64)),
    ("512-base-ema", None, None, ("epsilon", 64)),
    ("v2-1_768-ema-pruned", None, None, ("v_prediction", 96)),
    ("anything", 'model:\n  params:\n    parameterization: "v"\n', None, ("v_prediction", 96)),
    ("anything-512", "model:\n  params:\n    parameterization: eps\n", None, ("epsilon", 64)),
    ("sd2-model", None, "epsilon", ("epsilon", 64)),
])
def test_sd2_prediction_type_rule(tmp_path, name, sidecar, override, expected):
    from sdtune.models.single_file import resolve_prediction_type

    path = tmp_path / f"{name}.safetensors"
    if sidecar:
        path.with_suffix(".yaml").write_text(sidecar)
    assert resolve_prediction_type(path, "sd2", {}, override) == expected
    if not sidecar:
        assert resolve_prediction_type(path, "sd1", {}, None) == ("epsilon", None)


def test_vpred_and_ztsnr_markers(exported, tmp_path):
    sd = load_file(str(exported["sdxl"][1]))
    sd.update(v_pred=torch.zeros(0), ztsnr=torch.zeros(0))
    save_file(sd, str(tmp_path / "vpred.safetensors"))
    m = load_model(tmp_path / "vpred.safetensors")
    assert m.prediction_type == "v_prediction" and m.pipe.scheduler.config.rescale_betas_zero_snr


def test_prediction_type_from_metadata_and_override(exported, tmp_path):
    sd = load_file(str(exported["sd2"][1]))
    eps = tmp_path / "eps.safetensors"
    save_file(sd, str(eps), metadata={"modelspec.prediction_type": "epsilon"})
    m = load_model(eps)
    assert m.prediction_type == "epsilon" and m.pipe.scheduler.config.prediction_type == "epsilon"
    m = load_model(eps, prediction_type="v_prediction")
    assert m.prediction_type == "v_prediction" and m.pipe.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(SdtuneError, match="unknown prediction type"):
        load_model(eps, prediction_type="x0")


# ------------------------------------------------------------------ VAE swap


def test_vae_swap_from_file_and_folder(exported, tmp_path):
    from sdtune.formats.checkpoint import vae_to_ldm

    donor = tiny_pipeline("sd1", seed=7).vae
    donor.save_pretrained(tmp_path / "vae_folder")
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "vae_diffusers.safetensors"))
    torch.save({"state_dict": {k: v.contiguous() for k, v in vae_to_ldm(donor.state_dict()).items()}},
               tmp_path / "vae_ldm.pt")
    path = exported["sd1"][1]
    for vae in ("vae_folder", "vae_diffusers.safetensors", "vae_ldm.pt"):
        m = load_model(path, vae=tmp_path / vae)
        got = m.pipe.vae.state_dict()
        assert all(torch.equal(got[k], v) for k, v in donor.state_dict().items()), vae
        assert m.pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    with pytest.raises(SdtuneError, match="not a VAE"):
        load_model(path, vae=_lora_file(tmp_path))
    with pytest.raises(SdtuneError, match="VAE .* not found"):
        load_model(path, vae=tmp_path / "missing")


def _lora_file(tmp_path: Path) -> Path:
    p = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(p))
    return p


def test_save_single_file_validates(exported, tmp_path):
    pipe, _ = exported["sd1"]
    with pytest.raises(SdtuneError, match=".safetensors only"):
        save_single_file(pipe, tmp_path / "x.ckpt", "sd1")
    with pytest.raises(SdtuneError, match="unknown family"):
        save_single_file(pipe, tmp_path / "x.safetensors", "sd3")
    with pytest.raises(SdtuneError, match="text_encoder_2"):
        save_single_file(pipe, tmp_path / "x.safetensors", "sdxl")
    assert not any(p.name.startswith("x") for p in tmp_path.iterdir())
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ real architectures (shapes only, meta device)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_architectures_resolve_to_shipped_configs(family):
    """Full-size SD1.5 / SD2.1 / SDXL / refiner layouts (built on the meta device, no weights) are detected and
    their configs inferred from shapes equal the shipped configs, and the converted weights fit those models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.formats.checkpoint import hf_clip_keys, openclip_from_hf, unet_to_ldm, vae_to_ldm
    from sdtune.models import infer
    from sdtune.models.single_file import components_from_state_dict

    def clean(d):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if not k.startswith("_")}

    unet_base, vae_base = infer.family_config(family, "unet"), infer.family_config(family, "vae")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_base)
        vae = AutoencoderKL.from_config(vae_base)
        te_cfgs = {c: infer.family_config(family, c) for c in ("text_encoder", "text_encoder_2")
                   if (infer.configs_dir(family) / c).is_dir()}
        tes = {c: (CLIPTextModelWithProjection if c.endswith("2") else CLIPTextModel)(
            CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})) for c, cfg in te_cfgs.items()}
    ldm = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    ldm.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict()).items()})
    prefixes = {"sd1": {"text_encoder": "cond_stage_model.transformer."},
                "sd2": {"text_encoder": "cond_stage_model.model."},
                "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.",
                         "text_encoder_2": "conditioner.embedders.1.model."},
                "sdxl-refiner": {"text_encoder_2": "conditioner.embedders.0.model."}}[family]
    for comp, prefix in prefixes.items():
        sd = tes[comp].state_dict()
        conv = hf_clip_keys(sd) if prefix.endswith("transformer.") else openclip_from_hf(sd, family == "sd2")
        ldm.update({prefix + k: v for k, v in conv.items()})
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    if family == "sd2":  # real SD2 files have 24 OpenCLIP blocks; diffusers keeps 23
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in shapes

    assert detect_family(shapes) == family
    cfg = infer.unet_config(shapes, family)
    if family.startswith("sdxl"):
        infer.set_addition_time_embed_dim(cfg, 1280, family)
    want = clean(unet_base)
    got = clean(cfg)
    assert {k: got.get(k) for k in want if k != "sample_size"} == {k: v for k, v in want.items() if k != "sample_size"}
    assert clean(infer.vae_config(shapes, family)) == clean(vae_base)
    for comp, prefix in prefixes.items():
        base = {k: v for k, v in te_cfgs[comp].items() if k != "architectures"}
        if prefix.endswith("transformer."):
            inferred = infer.clip_config(shapes, base, prefix + "text_model.")
        else:
            inferred = infer.openclip_config(shapes, base, prefix, drop_last=family == "sd2")
        if family == "sd2":
            inferred["projection_dim"] = base["projection_dim"]  # SD2 ignores its projection
        assert inferred == base, comp
    # and the whole loader path accepts the full-size weights (meta tensors: shapes are checked, no data)
    comps = components_from_state_dict(ldm, family)
    assert sum(p.numel() for p in comps["unet"].parameters()) == sum(p.numel() for p in unet.parameters())
    for comp in prefixes:
        assert comps[comp].config.num_hidden_layers == te_cfgs[comp]["num_hidden_layers"]
        assert len(comps[comp.replace("text_encoder", "tokenizer")]) == 49408
