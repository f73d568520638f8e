"""`LoraNetwork`: a LoRA file's content in memory, independent of the file format.

Each module holds `down` (kohya lora_down = PEFT lora_A), `up` (lora_up = lora_B) and `alpha`; the weight delta at
multiplier 1 is `up @ down * alpha / rank` (for convs: the same product over the kernel). LyCORIS LoCon's Tucker
cores are folded into `down` when read (see `lycoris.py`); LoHa/LoKr modules keep their own tensors, in
`LoraNetwork.lycoris` (see `loha_lokr.py`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from sdtune.adapters.lora.loha_lokr import LycorisModule
from sdtune.errors import SdtuneError

FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def family_name(family: str | None) -> str:
    return FAMILY_NAMES.get(family or "", family or "unknown")


@dataclass
class LoraModule:
    """One module's low-rank factors. Shapes: linear down [r, in], up [out, r]; conv down [r, in, kh, kw],
    up [out, r, 1, 1]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this module changes."""
        return (int(self.up.shape[0]), *(int(s) for s in self.down.shape[1:]))

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight delta at multiplier 1, in `dtype` (computed in float32 at least)."""
        calc = torch.promote_types(dtype, torch.float32)
        up = self.up.to(calc).flatten(1)  # [out, r]
        d = up @ self.down.to(calc).flatten(1)
        return (d * self.scale).reshape(self.weight_shape()).to(dtype)

    def tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        yield "lora_down", self.down
        yield "lora_up", self.up


@dataclass
class LoraNetwork:
    """modules: canonical name (`unet.<path>`, `text_encoder.text_model.<path>`, `text_encoder_2...`) -> module.
    family: sd1/sd2/sdxl or None when unknown. metadata: the file's string metadata (ss_*, sdtune_* ...).
    unet_layout: layers per block / block types of the UNet the LoRA was made for (needed for SGM names).
    unknown_keys: keys that were read but are not modules this code knows (only when read with strict=False)."""

    modules: dict[str, LoraModule]
    family: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    unet_layout: dict[str, Any] | None = None
    source: str = ""
    unknown_keys: list[str] = field(default_factory=list)  # keys of the file that are not LoRA modules
    # Textual Inversion embeddings bundled in the file: {name: {"*" | "clip_l" | "clip_g": [n, width]}}
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # LyCORIS LoHa/LoKr modules (same canonical names), applied from their own tensors (`loha_lokr.py`)
    lycoris: dict[str, LycorisModule] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return sorted({name.split(".", 1)[0] for name in (*self.modules, *self.lycoris)})

    def all_modules(self) -> dict[str, LoraModule | LycorisModule]:
        return {**self.modules, **self.lycoris}

    def deltas(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: m.delta(dtype) for name, m in self.all_modules().items()}

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())

    def alphas(self) -> Counter:
        return Counter(float(m.alpha) for m in self.modules.values())

    def parameters(self) -> int:
        return sum(t.numel() for m in self.all_modules().values() for _, t in m.tensors())

    def algorithms(self) -> list[str]:
        """The algorithms of the modules ("LoRA", "LoHa", "LoKr"), most common first."""
        algos = Counter(m.algorithm for m in self.lycoris.values())
        if self.modules:
            algos["LoRA"] = len(self.modules)
        return [a for a, _ in algos.most_common()]

    def describe(self) -> str:
        algos = self.algorithms()
        if self.lycoris:
            native = Counter([m.native_rank for m in self.lycoris.values()] + [m.rank for m in self.modules.values()])
            shown = ", ".join(str(r) if r is not None else "full" for r in sorted(native, key=lambda r: r or 0))
            return (f"{'/'.join(algos)}, {len(self.modules)} modules ({', '.join(self.components)}), rank {shown}, "
                    f"family {family_name(self.family)}")
        ranks = ", ".join(f"{r}" for r in sorted(self.ranks()))
        return (f"{len(self.modules)} modules ({', '.join(self.components)}), rank {ranks}, "
                f"family {family_name(self.family)}")


# ------------------------------------------------------------------ validation


def check_finite(key: str, t: torch.Tensor, source: str = "") -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "infinite"
        where = f"{source}: " if source else ""
        raise SdtuneError(f"{where}tensor {key!r} contains {bad} values; the LoRA is broken (a diverged training "
                          "run or a corrupt file) and is refused")


def check_alpha(key: str, alpha: float, source: str = "") -> None:
    where = f"{source}: " if source else ""
    if not math.isfinite(alpha):
        raise SdtuneError(f"{where}alpha of {key!r} is {alpha}; the LoRA is broken and is refused")
    if alpha == 0:
        raise SdtuneError(f"{where}alpha of {key!r} is 0, so its scale alpha/rank would be 0 and the LoRA would do "
                          "nothing; use alpha = rank (scale 1) or e.g. alpha = rank/2")


def check_module(name: str, m: LoraModule, source: str = "", *, max_rank: bool = False) -> None:
    """Shapes consistent, values finite, alpha usable; with `max_rank` also rank <= the layer's smaller side."""
    where = f"{source}: " if source else ""
    if m.down.ndim not in (2, 4) or m.up.ndim != m.down.ndim:
        raise SdtuneError(f"{where}{name}: lora_down {list(m.down.shape)} and lora_up {list(m.up.shape)} are not "
                          "a linear (2-D) or conv (4-D) pair")
    if m.up.shape[1] != m.down.shape[0]:
        raise SdtuneError(f"{where}{name}: rank of lora_down {list(m.down.shape)} and lora_up {list(m.up.shape)} "
                          "differ")
    if m.up.ndim == 4 and tuple(m.up.shape[2:]) != (1, 1):
        raise SdtuneError(f"{where}{name}: lora_up has a {tuple(m.up.shape[2:])} kernel; only 1x1 is supported")
    for part, t in m.tensors():
        check_finite(f"{name} ({part})", t, source)
    check_alpha(name, float(m.alpha), source)
    if max_rank:
        out_dim = int(m.up.shape[0])
        in_dim = int(math.prod(m.down.shape[1:]))
        if m.rank > min(out_dim, in_dim):
            raise SdtuneError(f"{where}{name}: rank {m.rank} is larger than the layer allows "
                              f"(min(out {out_dim}, in {in_dim}) = {min(out_dim, in_dim)}); a LoRA that large is "
                              "not low-rank, use a smaller rank")


def check_network(net: LoraNetwork, *, max_rank: bool = False) -> None:
    if not net.modules and not net.lycoris:
        raise SdtuneError(f"{net.source or 'LoRA'}: no LoRA modules")
    for name, m in net.modules.items():
        check_module(name, m, net.source, max_rank=max_rank)


# ------------------------------------------------------------------ family


def check_family(lora_family: str | None, model_family: str | None, source: str, model_name: str = "the model"
                 ) -> None:
    """Refuse a LoRA made for another model family, naming both."""
    if lora_family and model_family and lora_family != model_family:
        raise SdtuneError(f"{source} is a {family_name(lora_family)} LoRA but {model_name} is "
                          f"{family_name(model_family)}; use a LoRA trained for {family_name(model_family)}")


def family_from_metadata(meta: Mapping[str, str]) -> str | None:
    fam = meta.get("sdtune_family")
    if fam in FAMILY_NAMES:
        return fam
    from sdtune.models.family import family_from_kohya_version

    kohya = family_from_kohya_version(meta.get("ss_base_model_version"))
    if kohya is not None:
        return kohya
    arch = str(meta.get("modelspec.architecture", "")).lower()
    if arch.startswith("stable-diffusion-xl-v1-refiner"):
        return "sdxl-refiner"
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1"):
        return "sd1"
    if str(meta.get("ss_v2", "")).lower() == "true":
        return "sd2"
    return None


def family_from_shapes(modules: Mapping[str, LoraModule | LycorisModule]) -> str | None:
    """From real-model widths: cross-attention key/value input 768 SD1, 1024 SD2, 2048 SDXL; a second text
    encoder means SDXL; the first text encoder's width 768 (SD1) or 1024 (SD2)."""
    if any(n.startswith("text_encoder_2.") for n in modules):
        return "sdxl"
    for name, m in modules.items():
        if name.startswith("unet.") and (".attn2.to_k" in name or ".attn2.to_v" in name):
            fam = _WIDTH_FAMILY.get(int(m.weight_shape()[1]))
            if fam:
                return fam
    for name, m in modules.items():
        if name.startswith("text_encoder.") and name.endswith("self_attn.q_proj"):
            width = int(m.weight_shape()[1])
            if width in (768, 1024):
                return _WIDTH_FAMILY[width]
    return None


def detect_family(modules: Mapping[str, LoraModule | LycorisModule], meta: Mapping[str, str], sgm_names: bool = False) -> str | None:
    """Family of a LoRA: shapes of real models first, then te1/te2 keys, then metadata, then SGM UNet names."""
    return family_from_shapes(modules) or family_from_metadata(meta) or ("sdxl" if sgm_names else None)


def layout_from_metadata(meta: Mapping[str, str]) -> dict[str, Any] | None:
    raw = meta.get("sdtune_unet_layout")
    if not raw:
        return None
    try:
        layout = json.loads(raw)
        return {"layers_per_block": int(layout["layers_per_block"]),
                "down_block_types": list(layout["down_block_types"]),
                "up_block_types": list(layout["up_block_types"])}
    except (ValueError, KeyError, TypeError):
        return None
