"""LyCORIS LoHa and LoKr modules: their tensors as the file holds them, and the weight delta they stand for.

The file format (LyCORIS; read the same way by A1111's extensions-builtin/Lora and ComfyUI's weight_adapter):

* LoHa: `hada_w1_a` [out, r], `hada_w1_b` [r, in*kh*kw] (and w2 the same);
  delta = (w1_a @ w1_b) * (w2_a @ w2_b), reshaped to the layer. Tucker convs (`hada_t1`/`hada_t2` [r, r, kh, kw])
  store `hada_w1_a` [r, out] and `hada_w1_b` [r, in]: W1[o, i, k, l] = sum_ab t1[a, b, k, l] w1_a[a, o] w1_b[b, i].
  Scale alpha / r with r = hada_w1_b.shape[0]; no alpha: scale 1.
* LoKr: W1 = `lokr_w1` [a, b] or `lokr_w1_a` [a, r] @ `lokr_w1_b` [r, b]; W2 = `lokr_w2` [c, d(, kh, kw)] or
  `lokr_w2_a` [c, r] @ `lokr_w2_b` [r, d*kh*kw] or Tucker (`lokr_t2` [r, r, kh, kw], `lokr_w2_a` [r, c],
  `lokr_w2_b` [r, d]); delta = kron(W1, W2) reshaped to the layer ([a*c, b*d(, kh, kw)]). Scale alpha / dim where
  dim = lokr_w2_b.shape[0] if W2 is factorised, else lokr_w1_b.shape[0] if W1 is; when both are full matrices (or
  there is no alpha) the scale is 1, whatever alpha says.

Why the native tensors are kept (not rewritten as LoRA factors): a Hadamard or Kronecker product can be written as
an exact LoRA only at a much higher rank, for SDXL 4 GiB (LoKr dim 8) to 16 GiB (full-matrix LoKr) of factors in
fp32 (measured with the rewrite this module first had; see docs/lora.md). Generation adds the delta computed from
these few tensors at each forward (`lycoris_hooks.py`); `sdtune merge` adds `delta()` once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from sdtune.errors import SdtuneError

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
PARTS = LOHA_PARTS + LOKR_PARTS


def algorithm_of(parts: Mapping[str, torch.Tensor]) -> str | None:
    """"LoHa", "LoKr" or None (an ordinary LoRA/LoCon module)."""
    if any(p in parts for p in LOHA_PARTS):
        return "LoHa"
    if any(p in parts for p in LOKR_PARTS):
        return "LoKr"
    return None


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[p, q, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, q]."""
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


@dataclass
class LycorisModule:
    """One LoHa/LoKr module. shape: the delta's shape as far as the file tells it: (out, in) for a linear or a conv
    whose kernel the file leaves to the layer ([out, in*kh*kw] flat), (out, in, kh, kw) when the file gives the
    kernel (Tucker cores, a 4-D lokr_w2). scale: alpha / dim by the rules above. native_rank: the file's rank (None
    for a LoKr of two full matrices)."""

    algorithm: str
    parts: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    scale: float
    native_rank: int | None

    def weight_shape(self) -> tuple[int, ...]:
        return self.shape

    def tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.parts.items()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LycorisModule":
        parts = {k: v.to(device=device, dtype=dtype) for k, v in self.parts.items()}
        return LycorisModule(self.algorithm, parts, self.shape, self.scale, self.native_rank)

    def delta(self, dtype: torch.dtype = torch.float32, multiplier: float = 1.0) -> torch.Tensor:
        """The weight delta times `multiplier` (scale included), in `shape`, computed in float32 at least. The
        factors are multiplied by scale * multiplier while small (one pass over a large tensor fewer: generation
        computes this at every forward)."""
        calc = torch.promote_types(dtype, torch.float32)
        p = {k: v.to(calc) for k, v in self.parts.items()}
        s = self.scale * multiplier
        if self.algorithm == "LoHa":
            if "hada_t1" in p:
                d = _tucker(p["hada_t1"] * s, p["hada_w1_a"], p["hada_w1_b"])
                d.mul_(_tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]))
            else:
                d = (p["hada_w1_a"] * s) @ p["hada_w1_b"].flatten(1)
                d.mul_(p["hada_w2_a"] @ p["hada_w2_b"].flatten(1))
        else:
            w1 = p["lokr_w1"] * s if "lokr_w1" in p else (p["lokr_w1_a"] * s) @ p["lokr_w1_b"]
            if "lokr_w2" in p:
                w2 = p["lokr_w2"]
            elif "lokr_t2" in p:
                w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            else:
                w2 = p["lokr_w2_a"] @ p["lokr_w2_b"].flatten(1)
            d = torch.kron(w1.contiguous(), w2.flatten(1).contiguous())
        return d.reshape(self.shape).to(dtype)


def _need(parts: Mapping[str, torch.Tensor], names: Iterable[str], what: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise SdtuneError(f"{what}: {', '.join(missing)} missing; the LyCORIS file is incomplete, re-export it")


def _bad(what: str, parts: Mapping[str, torch.Tensor]) -> SdtuneError:
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(parts.items()))
    return SdtuneError(f"{what}: the tensors do not fit together ({shapes}); the file is broken, re-export it")


def _factor_shape(parts: Mapping[str, torch.Tensor], a: str, b: str, t: str | None, what: str
                  ) -> tuple[tuple[int, ...], int]:
    """(shape of one factor W = a @ b or Tucker(t, a, b), its rank) after checking the shapes fit."""
    wa, wb = parts[a], parts[b]
    if t is not None and t in parts:
        core = parts[t]
        if core.ndim != 4 or wa.ndim != 2 or wb.ndim != 2 or core.shape[0] != wa.shape[0] \
                or core.shape[1] != wb.shape[0]:
            raise _bad(what, parts)
        return (int(wa.shape[1]), int(wb.shape[1]), *(int(s) for s in core.shape[2:])), int(wb.shape[0])
    if wa.ndim != 2 or wb.ndim not in (2, 4) or wa.shape[1] != wb.shape[0]:
        raise _bad(what, parts)
    if wb.ndim == 4:
        return (int(wa.shape[0]), int(wb.shape[1]), *(int(s) for s in wb.shape[2:])), int(wb.shape[0])
    return (int(wa.shape[0]), int(wb.shape[1])), int(wb.shape[0])


def lycoris_module(parts: Mapping[str, torch.Tensor], alpha: float | None, what: str) -> LycorisModule:
    """A LoHa/LoKr module's tensors (names without the module prefix) -> a checked `LycorisModule`."""
    algo = algorithm_of(parts)
    own = {k: v for k, v in parts.items() if k in PARTS}
    if algo == "LoHa":
        _need(parts, LOHA_PARTS[:4] + (("hada_t1", "hada_t2") if "hada_t1" in parts or "hada_t2" in parts else ()),
              what)
        s1, r = _factor_shape(parts, "hada_w1_a", "hada_w1_b", "hada_t1", what)
        s2, _ = _factor_shape(parts, "hada_w2_a", "hada_w2_b", "hada_t2", what)
        if math.prod(s1) != math.prod(s2) or s1[0] != s2[0]:
            raise _bad(what, parts)
        scale = alpha / r if alpha is not None else 1.0
        return LycorisModule("LoHa", own, s1 if len(s1) >= len(s2) else s2, scale, r)
    if algo != "LoKr":
        raise SdtuneError(f"{what}: not a LoHa or LoKr module")
    dim: int | None = None
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"]
        if w1.ndim != 2:
            raise _bad(what, parts)
        s1 = (int(w1.shape[0]), int(w1.shape[1]))
    else:
        _need(parts, ("lokr_w1_a", "lokr_w1_b"), what)
        s1, dim = _factor_shape(parts, "lokr_w1_a", "lokr_w1_b", None, what)
        if len(s1) != 2:
            raise _bad(what, parts)
    if "lokr_w2" in parts:
        s2 = tuple(int(s) for s in parts["lokr_w2"].shape)
        if len(s2) not in (2, 4):
            raise _bad(what, parts)
    else:
        _need(parts, ("lokr_w2_a", "lokr_w2_b"), what)
        s2, dim = _factor_shape(parts, "lokr_w2_a", "lokr_w2_b", "lokr_t2", what)
    shape = (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return LycorisModule("LoKr", own, shape, scale, dim)
