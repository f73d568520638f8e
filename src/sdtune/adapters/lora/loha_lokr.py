"""LyCORIS LoHa and LoKr modules, rewritten exactly as ordinary LoRA factors.

Why: generation applies LoRAs as diffusers/PEFT LoRA adapters (switchable, weight 0 = the base model) and
`sdtune merge` adds `up @ down * scale`; a LoHa or LoKr delta can be written as such a product *exactly* (no
approximation, only float rounding), at a higher rank, so both paths take them with no code of their own.

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

The rewrite: LoHa (U1 V1) * (U2 V2) = sum_ij (U1[:, i] * U2[:, j]) (V1[i] * V2[j]), rank r1*r2 (the face-splitting
product). LoKr kron(P1 Q1, P2 Q2) = kron(P1, P2) @ kron(Q1, Q2) with each W = P Q the cheapest of (I, W), (W, I) or
its own factors. Where that rank reaches the layer's smaller side the full delta is stored instead (up = I or
down = I), which is as exact. The scale is folded into `up` and alpha = rank (PEFT scale 1).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from sdtune.adapters.lora.network import LoraModule
from sdtune.errors import SdtuneError

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
PARTS = LOHA_PARTS + LOKR_PARTS

Pair = tuple[torch.Tensor, torch.Tensor]  # (P [rows, k], Q [k, cols]) with W = P @ Q


def algorithm_of(parts: Mapping[str, torch.Tensor]) -> str | None:
    """"LoHa", "LoKr" or None (an ordinary LoRA/LoCon module)."""
    if any(p in parts for p in LOHA_PARTS):
        return "LoHa"
    if any(p in parts for p in LOKR_PARTS):
        return "LoKr"
    return None


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, what: str) -> tuple[Pair, tuple[int, ...]]:
    """A Tucker-form factor (core t [r, r, kh, kw], wa [r, out], wb [r, in]) as (U [out, r], V [r, in*kh*kw])."""
    if t.ndim != 4 or wa.ndim != 2 or wb.ndim != 2 or t.shape[0] != wa.shape[0] or t.shape[1] != wb.shape[0]:
        raise SdtuneError(f"{what}: Tucker core {list(t.shape)} does not fit {list(wa.shape)} and {list(wb.shape)}")
    v = torch.einsum("abkl,bi->aikl", _f(t), _f(wb))  # [r, in, kh, kw]
    return (_f(wa).t(), v.flatten(1)), tuple(int(s) for s in t.shape[2:])


def _pair(a: torch.Tensor, b: torch.Tensor, what: str) -> Pair:
    if a.ndim != 2 or b.ndim < 2 or a.shape[1] != b.shape[0]:
        raise SdtuneError(f"{what}: {list(a.shape)} and {list(b.shape)} are not a factor pair [n, r] @ [r, m]")
    return _f(a), _f(b).flatten(1)


def _need(parts: Mapping[str, torch.Tensor], names: tuple[str, ...], what: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise SdtuneError(f"{what}: {', '.join(missing)} missing; the LyCORIS file is incomplete, re-export it")
    return [parts[n] for n in names]


def _cheapest(w: torch.Tensor, own: Pair | None) -> Pair:
    """W as P @ Q with the smallest inner size: (I, W), (W, I) or its own factors."""
    rows, cols = int(w.shape[0]), int(w.shape[1])
    eye = lambda n: torch.eye(n, dtype=w.dtype, device=w.device)  # noqa: E731
    options = [(rows, lambda: (eye(rows), w)), (cols, lambda: (w, eye(cols)))]
    if own is not None:
        options.append((int(own[0].shape[1]), lambda: own))
    return min(options, key=lambda o: o[0])[1]()


def _module(up: torch.Tensor, down: torch.Tensor, scale: float, kernel: tuple[int, ...] | None, algorithm: str,
            native_rank: int | None) -> LoraModule:
    """up [out, R] @ down [R, in_flat] * scale as a LoraModule (full delta where R reaches the layer's size)."""
    out, flat = int(up.shape[0]), int(down.shape[1])
    if int(up.shape[1]) >= min(out, flat):
        delta = up @ down
        eye = torch.eye(min(out, flat), dtype=delta.dtype, device=delta.device)
        up, down = (eye, delta) if out <= flat else (delta, eye)
    up = up * scale
    rank = int(down.shape[0])
    taps = math.prod(kernel) if kernel else 1
    if kernel is not None and taps > 1 and flat % taps == 0:  # a known conv kernel; otherwise the layer decides
        down = down.reshape(rank, flat // taps, *kernel)
        up = up[:, :, None, None]
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(rank), algorithm=algorithm,
                      native_rank=native_rank)


def _scale(alpha: float | None, dim: int | None) -> float:
    return alpha / dim if alpha is not None and dim is not None else 1.0


def loha_module(parts: Mapping[str, torch.Tensor], alpha: float | None, what: str) -> LoraModule:
    """A LoHa module's tensors -> an exact LoraModule (see the module docstring)."""
    w1a, w1b, w2a, w2b = _need(parts, LOHA_PARTS[:4], what)
    kernel: tuple[int, ...] | None = tuple(int(s) for s in w1b.shape[2:]) if w1b.ndim == 4 else None
    if "hada_t1" in parts or "hada_t2" in parts:
        t1, t2 = _need(parts, ("hada_t1", "hada_t2"), what)
        (u1, v1), kernel = _tucker(t1, w1a, w1b, what)
        (u2, v2), _ = _tucker(t2, w2a, w2b, what)
    else:
        u1, v1 = _pair(w1a, w1b, what)
        u2, v2 = _pair(w2a, w2b, what)
    if u1.shape[0] != u2.shape[0] or v1.shape[1] != v2.shape[1]:
        raise SdtuneError(f"{what}: the two Hadamard factors have different shapes "
                          f"({u1.shape[0]}x{v1.shape[1]} and {u2.shape[0]}x{v2.shape[1]})")
    r1, r2 = int(u1.shape[1]), int(u2.shape[1])
    up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], r1 * r2)
    down = (v1[:, None, :] * v2[None, :, :]).reshape(r1 * r2, v1.shape[1])
    return _module(up, down, _scale(alpha, int(w1b.shape[0])), kernel, "LoHa", int(w1b.shape[0]))


def lokr_module(parts: Mapping[str, torch.Tensor], alpha: float | None, what: str) -> LoraModule:
    """A LoKr module's tensors -> an exact LoraModule (see the module docstring)."""
    dim: int | None = None
    own1: Pair | None = None
    if "lokr_w1" in parts:
        w1 = _f(parts["lokr_w1"])
    else:
        a, b = _need(parts, ("lokr_w1_a", "lokr_w1_b"), what)
        own1 = _pair(a, b, what)
        w1, dim = own1[0] @ own1[1], int(b.shape[0])
    kernel: tuple[int, ...] | None = None
    own2: Pair | None = None
    if "lokr_w2" in parts:
        full = _f(parts["lokr_w2"])
        kernel = tuple(int(s) for s in full.shape[2:]) if full.ndim == 4 else None
        w2 = full.flatten(1)
    else:
        a, b = _need(parts, ("lokr_w2_a", "lokr_w2_b"), what)
        if "lokr_t2" in parts:
            own2, kernel = _tucker(parts["lokr_t2"], a, b, what)
        else:
            own2 = _pair(a, b, what)
            kernel = tuple(int(s) for s in b.shape[2:]) if b.ndim == 4 else None
        w2, dim = own2[0] @ own2[1], int(b.shape[0])
    if w1.ndim != 2:
        raise SdtuneError(f"{what}: lokr_w1 has shape {list(w1.shape)}; it must be a matrix")
    p1, q1 = _cheapest(w1, own1)
    p2, q2 = _cheapest(w2, own2)
    up, down = torch.kron(p1.contiguous(), p2.contiguous()), torch.kron(q1.contiguous(), q2.contiguous())
    return _module(up, down, _scale(alpha, dim), kernel, "LoKr", dim)


def lycoris_module(parts: Mapping[str, torch.Tensor], alpha: float | None, what: str) -> LoraModule:
    algo = algorithm_of(parts)
    if algo == "LoHa":
        return loha_module(parts, alpha, what)
    if algo == "LoKr":
        return lokr_module(parts, alpha, what)
    raise SdtuneError(f"{what}: not a LoHa or LoKr module")
