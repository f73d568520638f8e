"""LyCORIS files: LoCon is read (it is kohya's LoRA layout extended to 3x3 convs, plus optional Tucker cores), LoHa
and LoKr too (`loha_lokr.py`); the other LyCORIS algorithms (and DoRA's `dora_scale`, which makes the delta depend
on the base weight's norm, so it is no fixed delta) are recognised by their key names and refused with a clear
message.

LoCon needs no special names: its conv modules are `lora_unet_down_blocks_0_resnets_0_conv1` (SD1/SD2) or
`lora_unet_input_blocks_1_0_in_layers_2` (SDXL), with `lora_down.weight` [r, in, 3, 3] and `lora_up.weight`
[out, r, 1, 1]. With `use_tucker`/`use_cp` a 3x3 conv has `lora_down` [r, in, 1, 1], `lora_mid` [r, r, 3, 3] and
`lora_up`; the core is folded into an ordinary conv `lora_down` [r, in, 3, 3] (exact: the product is the same
kernel), so everything downstream, diffusers included, sees a plain LoCon.
"""

from __future__ import annotations

from typing import Iterable

import torch

from sdtune.errors import SdtuneError

# key fragment -> algorithm name
UNSUPPORTED = (
    (".oft_", "OFT"),
    (".oft_blocks", "OFT"),
    (".dora_scale", "DoRA"),
    (".on_input", "(IA)^3"),
    (".weight_in", "(IA)^3"),
    (".a1.weight", "GLoRA"),
    (".b1.weight", "GLoRA"),
    (".diff", "LyCORIS full (weight difference)"),
    (".w_norm", "LyCORIS norm-layer tuning"),
    (".b_norm", "LyCORIS norm-layer tuning"),
    (".lora_magnitude_vector", "DoRA"),
)


def unsupported_algorithms(keys: Iterable[str]) -> dict[str, list[str]]:
    """{algorithm: keys} for every key that belongs to a network type sdtune does not apply."""
    found: dict[str, list[str]] = {}
    for k in keys:
        for frag, algo in UNSUPPORTED:
            if frag in k and (frag != ".diff" or k.endswith((".diff", ".diff_b"))):  # not model.diffusion_model
                found.setdefault(algo, []).append(k)
                break
    return found


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def refuse_unsupported(keys: Iterable[str], source: str) -> None:
    keys = list(keys)
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in keys):
        raise SdtuneError(f"{source} is a model checkpoint (e.g. a DreamBooth result), not a LoRA: generate with it "
                          "as --model, or put it in the checkpoints folder")
    found = unsupported_algorithms(keys)
    if not found:
        return
    parts = "; ".join(f"{algo} ({len(ks)} keys, e.g. {ks[0]})" for algo, ks in found.items())
    raise SdtuneError(f"{source} is a LyCORIS/other network sdtune cannot apply: {parts}. sdtune supports LoRA, "
                      "LoCon (Tucker cores included), LoHa and LoKr; bake this file into a checkpoint with the "
                      "tool that made it, or retrain it as LoRA/LoCon")


def fold_tucker(down: torch.Tensor, mid: torch.Tensor, key: str, source: str) -> torch.Tensor:
    """lora_down [r, in, 1, 1] and a Tucker core lora_mid [r, r, kh, kw] -> one conv lora_down [r, in, kh, kw]."""
    if down.ndim != 4 or mid.ndim != 4 or tuple(down.shape[2:]) != (1, 1) or mid.shape[1] != down.shape[0]:
        raise SdtuneError(f"{source}: {key}: lora_mid {list(mid.shape)} does not fit lora_down {list(down.shape)}")
    calc = torch.promote_types(down.dtype, torch.float32)
    folded = torch.einsum("abkl,bi->aikl", mid.to(calc), down.to(calc).flatten(1))
    return folded.to(down.dtype)


def is_locon(shapes: Iterable[tuple[int, ...]]) -> bool:
    """Whether any lora_down has a kernel larger than 1x1 (LoCon / kohya conv_dim)."""
    return any(len(s) == 4 and tuple(s[2:]) != (1, 1) for s in shapes)
