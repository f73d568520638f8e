"""diffusers' own single-file loader (`from_single_file(ckpt, config=<folder>, local_files_only=True)`) on the shipped
config folders and on checkpoints sdtune writes: it must work offline and give the same tensors as `load_model`.

Full-size SD1.5/SDXL weights are 4-10 GB, so the folders are copied with every *width* shrunk and everything that
decides key names kept: block types, layers per block, transformer depth (SDXL's [1, 2, 10]), text encoder depth
(12 / 23 / 32 layers, SD2's 24th OpenCLIP block that diffusers drops), the 49408-token vocabulary, and the shipped
model_index.json, scheduler and tokenizer files unchanged. Key names at full size are covered on the meta device by
tests/test_models.py::test_real_architectures_resolve_to_shipped_configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sdtune.models.infer import configs_dir

# widths cut to 32-64 channels (heads of 32 channels; SDXL's two text encoders keep different widths, which is how
# diffusers tells CLIP-L from OpenCLIP-bigG); depths as shipped
SHRINK: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"unet": dict(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32),
            "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=1)},
    "sd2": {"unet": dict(block_out_channels=[32, 32, 64, 64], attention_head_dim=[1, 1, 2, 2],
                         cross_attention_dim=32),
            "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=1, projection_dim=32)},
    "sdxl": {"unet": dict(block_out_channels=[32, 32, 64], attention_head_dim=[1, 1, 2], cross_attention_dim=96,
                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8),
             "text_encoder": dict(hidden_size=32, intermediate_size=64, num_attention_heads=1),
             "text_encoder_2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                    projection_dim=64)},
    "sdxl-refiner": {"unet": dict(block_out_channels=[32, 32, 64, 64], attention_head_dim=[1, 1, 2, 2],
                                  cross_attention_dim=64, addition_time_embed_dim=8,
                                  projection_class_embeddings_input_dim=64 + 5 * 8),
                     "text_encoder_2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                            projection_dim=64)},
}
VAE_SHRINK = dict(block_out_channels=[32, 32, 32, 32])
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}


def shrunk_config_folder(family: str, dest: Path) -> Path:
    """A copy of the shipped `family` folder with model widths shrunk (see the module docstring)."""
    shutil.copytree(configs_dir(family), dest)
    for comp, changes in {**SHRINK[family], "vae": VAE_SHRINK}.items():
        path = dest / comp / "config.json"
        cfg = json.loads(path.read_text())
        assert set(changes) <= set(cfg) | {"projection_dim"}, comp  # only sizes the shipped config names
        path.write_text(json.dumps(cfg | changes))
    return dest


def random_pipeline(folder: Path, family: str, seed: int = 0) -> Any:
    """The family's pipeline with random weights, models built from `folder`'s configs, tokenizers from sdtune's
    CLIP tokenizer (independent of the folder's tokenizer files, which diffusers is the one to read)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.models.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    comps: dict[str, Any] = {"text_encoder": None, "tokenizer": None}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = sub.name
        if name in ("unet", "vae"):
            cls = diffusers.UNet2DConditionModel if name == "unet" else diffusers.AutoencoderKL
            comps[name] = cls.from_config(cls.load_config(sub)).eval()
        elif name.startswith("text_encoder"):
            te_cls = CLIPTextModelWithProjection if name.endswith("_2") else CLIPTextModel
            comps[name] = te_cls(CLIPTextConfig.from_pretrained(sub)).eval()
        elif name.startswith("tokenizer"):
            comps[name] = clip_tokenizer(json.loads((sub / "tokenizer_config.json").read_text())["pad_token"])
        elif name == "scheduler":
            cfg = json.loads((sub / "scheduler_config.json").read_text())
            comps[name] = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    with torch.no_grad():  # the default init leaves some weights at exactly 0/1; make every tensor tell
        for comp in comps.values():
            if isinstance(comp, torch.nn.Module):
                for p in comp.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
    pipe_cls = getattr(diffusers, PIPELINES[family])
    if family in ("sd1", "sd2"):
        comps.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe_cls(**comps)


def assert_same_tensors(a: Any, b: Any, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
    sb = {k: v for k, v in sb.items() if not k.endswith("position_ids")}
    assert sa.keys() == sb.keys(), what
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def test_shipped_model_index_is_diffusers_format():
    """Every component entry is [library, class] (or [null, null]), as diffusers' loaders unpack them."""
    for family in PIPELINES:
        index = json.loads((configs_dir(family) / "model_index.json").read_text())
        assert index["_class_name"] == PIPELINES[family]
        comps = {k: v for k, v in index.items() if isinstance(v, list)}
        assert {"unet", "vae", "scheduler"} <= comps.keys()
        for name, value in comps.items():
            assert len(value) == 2 and (value[0] in ("diffusers", "transformers") or value == [None, None]), name
            if value[0] is not None:
                assert (configs_dir(family) / name).is_dir(), name


def test_shipped_tokenizer_files_are_clip():
    """The tokenizer folders diffusers reads hold exactly the vocabulary sdtune derives from CLIP's BPE file."""
    from transformers import CLIPTokenizer

    from sdtune.models.tokenizer import clip_tokenizer, clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    folders = sorted(p for p in Path(configs_dir("sd1")).parent.glob("*/tokenizer*") if p.is_dir())
    assert len(folders) == 5
    text = "a photo of an astronaut riding a horse, 8k, ÄÖ émoji 🚀"
    assert json.loads((folders[0] / "vocab.json").read_text()) == vocab
    assert (folders[0] / "merges.txt").read_text().splitlines()[1:] == list(merges)
    for folder in folders[1:]:  # the other folders hold the same two files
        for name in ("vocab.json", "merges.txt"):
            assert (folder / name).read_bytes() == (folders[0] / name).read_bytes(), folder
    pads = {}
    for folder in folders:
        pads.setdefault(json.loads((folder / "tokenizer_config.json").read_text())["pad_token"], folder)
    assert sorted(pads) == ["!", "<|endoftext|>"]
    for folder in pads.values():
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        ours = clip_tokenizer(tok.pad_token)
        assert tok(text, padding="max_length").input_ids == ours(text, padding="max_length").input_ids


@pytest.mark.parametrize("family", list(PIPELINES))
def test_diffusers_from_single_file_with_shipped_configs(family, tmp_path):
    """A checkpoint sdtune writes loads offline through diffusers' `from_single_file(config=<shipped layout>)` and
    through sdtune's `load_model`, both giving the written model's tensors, tokenizers and scheduler."""
    import diffusers

    from sdtune.formats.checkpoint import save_single_file
    from sdtune.models import load_model

    folder = shrunk_config_folder(family, tmp_path / family)
    src = random_pipeline(folder, family)
    ckpt = save_single_file(src, tmp_path / "model.safetensors", family=family)

    pipe_cls = getattr(diffusers, PIPELINES[family])
    theirs = pipe_cls.from_single_file(str(ckpt), config=str(folder), local_files_only=True)
    ours = load_model(ckpt, device="cpu", dtype="fp32").pipe
    assert type(theirs) is type(ours) is pipe_cls
    names = ["unet", "vae"] + [n for n in ("text_encoder", "text_encoder_2") if getattr(src, n, None) is not None]
    for name in names:
        assert_same_tensors(getattr(theirs, name), getattr(src, name), f"diffusers {name}")
        assert_same_tensors(getattr(ours, name), getattr(src, name), f"sdtune {name}")
        for key in ("block_out_channels", "hidden_size", "num_hidden_layers", "transformer_layers_per_block",
                    "upcast_attention", "scaling_factor", "projection_dim"):
            if key in getattr(src, name).config:
                want = getattr(getattr(src, name).config, key)
                assert getattr(getattr(theirs, name).config, key) == want, (name, key)
                assert getattr(getattr(ours, name).config, key) == want, (name, key)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(src, name, None) is not None:
            text = "a red cube, 4k"
            assert getattr(theirs, name)(text).input_ids == getattr(src, name)(text).input_ids
            assert getattr(theirs, name).pad_token == getattr(ours, name).pad_token == getattr(src, name).pad_token
    assert type(theirs.scheduler) is type(src.scheduler)
    assert theirs.scheduler.config.prediction_type == src.scheduler.config.prediction_type
    assert ours.scheduler.config.prediction_type == src.scheduler.config.prediction_type


@pytest.mark.parametrize("family,suffix", [("sd1", ".safetensors"), ("sd2", ".ckpt")])
def test_config_folder_for_any_checkpoint(family, suffix, tmp_path, monkeypatch):
    """`write_checkpoint_config_folder` gives diffusers' loader the configs sdtune resolves for a checkpoint of any
    size: from the file's sdtune metadata, or (a .ckpt has none) read off the weights; both loaders then agree.
    sdtune hands diffusers the state dict it read itself (a .ckpt unpickled once, weights-only), never the file."""
    import diffusers
    import diffusers.loaders.single_file_model as sfm
    from safetensors.torch import load_file

    from sdtune.formats.checkpoint import save_single_file
    from sdtune.models import load_model
    from sdtune.models.single_file import write_checkpoint_config_folder
    from sdtune.models.testing import tiny_pipeline

    src = tiny_pipeline(family, seed=3)
    ckpt = save_single_file(src, tmp_path / "model.safetensors", family=family)
    if suffix == ".ckpt":  # same tensors, no metadata
        torch.save({"state_dict": load_file(str(ckpt))}, tmp_path / "model.ckpt")
        ckpt = tmp_path / "model.ckpt"
    folder = write_checkpoint_config_folder(ckpt, tmp_path / "config")
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(ckpt), config=str(folder), local_files_only=True)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("diffusers opened the checkpoint file")

    with monkeypatch.context() as patch:
        patch.setattr(sfm, "load_single_file_checkpoint", refuse)
        ours = load_model(ckpt, device="cpu", dtype="fp32").pipe
    for name in ("unet", "vae", "text_encoder"):
        assert_same_tensors(getattr(theirs, name), getattr(ours, name), name)
        assert_same_tensors(getattr(ours, name), getattr(src, name), name)
    assert dict(theirs.unet.config) == dict(ours.unet.config)
    skip = {"architectures", "_name_or_path", "transformers_version"}  # bookkeeping, not architecture
    te_a, te_b = theirs.text_encoder.config.to_dict(), ours.text_encoder.config.to_dict()
    assert {k: v for k, v in te_a.items() if k not in skip} == {k: v for k, v in te_b.items() if k not in skip}
    assert type(theirs.scheduler) is type(ours.scheduler)
    assert {k: v for k, v in theirs.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in ours.scheduler.config.items() if not k.startswith("_")}
    assert theirs.tokenizer("a red cube").input_ids == ours.tokenizer("a red cube").input_ids
    assert theirs.tokenizer.pad_token == ours.tokenizer.pad_token == src.tokenizer.pad_token
