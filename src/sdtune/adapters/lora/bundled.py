"""Textual Inversion embeddings bundled inside a LoRA file, as A1111's LoRA loader reads them (written by A1111-era
trainers, OneTrainer and sdtune's pivotal tuning).

Keys: `bundle_emb.<name>.string_to_param.*` ([n, width], SD1/SD2: A1111's embedding dict flattened) or
`bundle_emb.<name>.clip_l` / `bundle_emb.<name>.clip_g` (SDXL), also `bundle_emb.<name>.emb_params`. A1111 takes the
embedding name from the second part and the vector key from the last part, and makes the embedding usable by name
while the LoRA is loaded; sdtune does the same (`LoraExtraNetwork`).
"""

from __future__ import annotations

from typing import Mapping

import torch

from sdtune.errors import SdtuneError

PREFIX = "bundle_emb."
SINGLE_KEYS = ("*", "emb_params", "string_to_param")  # one-encoder vector keys -> sdtune's "*"


def split_bundled(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the LoRA's own tensors, {embedding name: {"*" | "clip_l" | "clip_g": [n, width]}})."""
    lora: dict[str, torch.Tensor] = {}
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if not key.startswith(PREFIX):
            lora[key] = value
            continue
        parts = key.split(".")
        if len(parts) < 3 or not parts[1]:
            raise SdtuneError(f"bundled embedding key {key!r} has no embedding name (bundle_emb.<name>.<vectors>)")
        name, vec = parts[1], parts[-1]
        slot = "*" if vec in SINGLE_KEYS else vec
        if slot not in ("*", "clip_l", "clip_g"):
            raise SdtuneError(f"bundled embedding {name!r}: vector key {vec!r} is not string_to_param.*, clip_l or "
                              "clip_g")
        t = value.detach().float()
        embeddings.setdefault(name, {})[slot] = t.unsqueeze(0) if t.dim() == 1 else t
    return lora, embeddings


def bundle_keys(embeddings: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The keys A1111 reads for these embeddings: `string_to_param.*` for one encoder, clip_l/clip_g for SDXL."""
    out: dict[str, torch.Tensor] = {}
    for name, vectors in embeddings.items():
        for slot, t in vectors.items():
            key = f"{PREFIX}{name}.string_to_param.*" if slot == "*" else f"{PREFIX}{name}.{slot}"
            out[key] = t.detach().to("cpu", torch.float32).contiguous()
    return out
