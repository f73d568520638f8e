"""`read_lora` / `save_lora`: one entry point for every LoRA layout sdtune knows (kohya, LyCORIS LoCon,
diffusers/PEFT), through `formats.safe_io` (truncated/corrupt files and code-carrying pickles are refused there)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from sdtune.adapters.lora.diffusers_format import diffusers_to_network, is_diffusers, save_diffusers
from sdtune.adapters.lora.kohya import is_kohya, kohya_to_network, save_kohya
from sdtune.adapters.lora.network import LoraNetwork, check_family
from sdtune.errors import SdtuneError

log = logging.getLogger(__name__)

FORMATS = ("kohya", "diffusers")


def _peft_config_next_to(path: Path) -> dict[str, Any] | None:
    cfg = path.parent / "adapter_config.json"
    if path.name.startswith("adapter_model") and cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None
    return None


def unknown_keys_message(source: str, unknown: list[str], limit: int = 20) -> str:
    shown = ", ".join(unknown[:limit]) + (f" ... ({len(unknown) - limit} more)" if len(unknown) > limit else "")
    return (f"{source}: {len(unknown)} key(s) are not LoRA modules sdtune knows and would be ignored: {shown}")


def network_from_state_dict(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None, *,
                            source: str = "LoRA", layout: Mapping[str, Any] | None = None, strict: bool = True,
                            peft_config: Mapping[str, Any] | None = None, expect_family: str | None = None,
                            model_name: str = "the model") -> LoraNetwork:
    """Parse an in-memory LoRA state dict (kohya or diffusers/PEFT layout).

    strict: unknown keys raise an SdtuneError naming them; otherwise they are logged as a warning with the full
    list and kept in `network.unknown_keys`. expect_family: the model's family; a LoRA detected as another family
    is refused first (before unknown keys, which a LoRA for another model is full of)."""
    from sdtune.adapters.lora.bundled import split_bundled

    meta = dict(meta or {})
    sd, bundled = split_bundled(sd)  # embeddings bundled in the file (A1111 reads them with the LoRA)
    keys = list(sd)
    if is_kohya(keys):
        net = kohya_to_network(sd, meta, source=source, layout=layout)
    elif is_diffusers(keys):
        net = diffusers_to_network(sd, meta, source=source, peft_config=peft_config)
        if layout is not None:
            net.unet_layout = dict(layout)
    else:
        from sdtune.adapters.lora.lycoris import refuse_unsupported

        refuse_unsupported(keys, source)
        raise SdtuneError(f"{source} is not a LoRA file (no lora_down/lora_up or lora_A/lora_B keys; e.g. "
                          f"{', '.join(keys[:3]) or 'no tensors'}); run `sdtune info` on it to see what it is")
    net.embeddings = bundled
    check_family(net.family, expect_family, source, model_name)
    if not net.modules and not net.lycoris:
        raise SdtuneError(f"{source}: no LoRA module in the file matches a UNet or text-encoder layer; "
                          + unknown_keys_message(source, net.unknown_keys).split(": ", 1)[1])
    if net.unknown_keys:
        msg = unknown_keys_message(source, net.unknown_keys)
        if strict:
            raise SdtuneError(msg + "; pass strict=False to load the rest anyway")
        log.warning("%s", msg)
    return net


def read_lora(path: str | Path, *, layout: Mapping[str, Any] | None = None, strict: bool = True,
              expect_family: str | None = None, model_name: str = "the model") -> LoraNetwork:
    """Read a LoRA file (.safetensors, or a weights-only .pt/.ckpt/.bin) into a `LoraNetwork`.

    Refuses: NaN/inf weights (naming the key), alpha 0, LoHa/LoKr/other LyCORIS types, inconsistent shapes, and
    (strict) keys that are not LoRA modules, and (expect_family) LoRAs for another model family. layout: the target
    UNet's layout, for SDXL-style (SGM) names on non-standard UNets when the file has no `sdtune_unet_layout`
    metadata; by default the family's shipped config."""
    from sdtune.formats.safe_io import check_file, read_safetensors_metadata, read_state_dict

    p = check_file(path)
    sd = read_state_dict(p)
    meta = read_safetensors_metadata(p) if p.suffix.lower() == ".safetensors" else {}
    net = network_from_state_dict(sd, meta, source=p.name, layout=layout, strict=strict,
                                  peft_config=_peft_config_next_to(p), expect_family=expect_family,
                                  model_name=model_name)
    net.source = str(p)
    return net


def save_lora(net: LoraNetwork, path: str | Path, format: str = "kohya", **kwargs: Any) -> Path:
    """Write `net` as `format` ("kohya": A1111/ComfyUI/kohya/diffusers all read it; "diffusers": PEFT layout).

    A network read from a LoHa/LoKr file is refused: a LoRA of the file's rank cannot hold a Hadamard/Kronecker-
    product delta (an exact one needs rank up to the layer's size)."""
    lycoris = [a for a in net.algorithms() if a != "LoRA"]
    if lycoris:
        kind = " and ".join(f"{a} ({'Hadamard' if a == 'LoHa' else 'Kronecker'}-product delta)" for a in lycoris)
        raise SdtuneError(f"{Path(net.source).name or 'this network'} is a LyCORIS {kind}: the kohya/diffusers "
                          "LoRA formats cannot hold it exactly at its rank; use the file as it is (sdtune "
                          "generate --lora, sdtune merge; A1111 and ComfyUI read it too)")
    if format == "kohya":
        return save_kohya(net, path, **kwargs)
    if format == "diffusers":
        kwargs.pop("family", None)
        kwargs.pop("layout", None)
        return save_diffusers(net, path, **kwargs)
    raise SdtuneError(f"unknown LoRA format {format!r}; use one of {', '.join(FORMATS)}")
