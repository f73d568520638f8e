"""Diffusers config folders (model_index.json + one config per component, no weights) for single-file checkpoints.

diffusers' single-file loaders (`Pipeline.from_single_file`, `UNet2DConditionModel.from_single_file`, ...) take the
architecture only from such a folder (`config=`; without one they look a hub repository up, which sdtune never does).
The shipped folders (models/configs) fit full-size checkpoints; this module writes the folder that fits any other
checkpoint (test models, the toy model, files whose sizes were read off their weights), laid out like the shipped
ones, so that sdtune's loader and a plain `from_single_file(ckpt, config=folder, local_files_only=True)` agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from sdtune.models import infer

# a single-file checkpoint's text encoders as diffusers classes (the refiner has no first one)
TEXT_ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
_MODEL_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(data), indent=2, sort_keys=True, default=list) + "\n")


def write_model_configs(folder: Path, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """`folder/<unet|vae>/config.json` for the diffusers models among `configs` (what `ModelMixin.load_config`
    reads for `from_single_file(config=folder, subfolder=...)`)."""
    for name, cls in _MODEL_CLASSES.items():
        if name in configs:
            _write_json(folder / name / "config.json", {**configs[name], "_class_name": cls})


def write_config_folder(dest: str | Path, family: str, configs: Mapping[str, Mapping[str, Any]],
                        tokenizers: Mapping[str, Any], scheduler: Any) -> Path:
    """Write a complete config folder: `configs` holds unet, vae and text_encoder[_2] configs, `tokenizers` the
    tokenizer[_2] objects (saved with `save_pretrained`), `scheduler` a diffusers scheduler. model_index.json is the
    shipped one of `family` (which components exist, and as which classes) naming `scheduler`'s class."""
    from transformers import CLIPTextConfig

    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    index = infer.family_config(family, "model_index")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]  # diffusers builds the class model_index names
    _write_json(folder / "model_index.json", index)
    write_model_configs(folder, configs)
    for name, cls in TEXT_ENCODER_CLASSES.items():
        if name in configs:
            cfg = CLIPTextConfig(**{k: v for k, v in configs[name].items()
                                    if not k.startswith("_") and k != "architectures"})
            cfg.architectures = [cls]
            cfg.save_pretrained(folder / name)
    for name, tok in tokenizers.items():
        tok.save_pretrained(folder / name)
    scheduler.save_config(folder / "scheduler")
    return folder
