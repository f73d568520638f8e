"""How token weights are applied to the text encoder's output z (one chunk of 77 positions at a time).

- `original` (A1111's default): z = z * w, then z = z * (mean(z_before) / mean(z_after)), so the chunk's overall
  mean is unchanged and weights act relative to each other. (When the new mean is nearly zero, e.g. a model whose
  final layer norm has no bias, the ratio is skipped rather than blowing up.)
- `none`: z = z * w, nothing else (A1111's "No norm").
- `compel`: up-weighting (w > 1) moves a token away from the empty prompt's encoding e at the same position:
  z = e + (z - e) * w. Down-weighting (w < 1) blends towards an encoding of the same prompt in which the fragment is
  masked out: z = w * z + (1 - w) * z_masked (see `encoder.py` for z_masked).

`auto` picks `compel` for prompts in compel syntax and `original` otherwise. Weights of exactly 1 everywhere leave
z untouched in every mode (bit for bit).
"""

from __future__ import annotations

from typing import Any

from sdtune.errors import SdtuneError

EMPHASES = ("auto", "original", "none", "compel")


def resolve_emphasis(emphasis: str, syntax: str) -> str:
    if emphasis not in EMPHASES:
        raise SdtuneError(f"unknown emphasis mode {emphasis!r}; use one of {', '.join(EMPHASES)}")
    if emphasis == "auto":
        return "compel" if syntax == "compel" else "original"
    return emphasis


def multiply(z: Any, weights: Any) -> Any:
    """z [N, 77, D] * weights [N, 77]."""
    return z * weights.unsqueeze(-1).to(z.dtype)


def original(z: Any, weights: Any) -> Any:
    """A1111's 'Original' emphasis, per chunk. A chunk whose new mean is (nearly) zero - below 1e-4 of its mean
    absolute value, where the ratio would only amplify rounding noise - or not finite is only multiplied."""
    import torch

    before = z.float().mean(dim=(1, 2))
    out = multiply(z.float(), weights.float())
    after = out.mean(dim=(1, 2))
    scale = out.abs().mean(dim=(1, 2))
    ok = (after.abs() > 1e-4 * scale) & torch.isfinite(after) & torch.isfinite(before)
    ratio = torch.where(ok, before / torch.where(ok, after, torch.ones_like(after)), torch.ones_like(after))
    return (out * ratio[:, None, None]).to(z.dtype)


def compel_up(z: Any, weights: Any, empty: Any) -> Any:
    """z = e + (z - e) * w for tokens with w > 1 (others unchanged). empty: [77, D]."""
    w = weights.clamp(min=1.0).unsqueeze(-1).float()
    e = empty.float().unsqueeze(0)
    out = e + (z.float() - e) * w
    return (out.where(w > 1, z.float())).to(z.dtype)
