"""Learning-rate schedules and the early-stopping setting, parsed from what users type.

A learning rate is either one number ("1e-4") or A1111's piecewise schedule "0.005:100, 1e-3:1000, 1e-5": 0.005
for steps 1..100, 1e-3 for steps 101..1000, then 1e-5. A final piece with a step bound keeps its rate after that
step (A1111 would stop training there; here `steps` decides when training ends).

`lr_scheduler` then shapes the rate over the run (a factor in [0, 1] applied to the piecewise rate):
constant, constant_with_warmup, linear (warmup, then linear decay to 0 at `steps`) and cosine (warmup, then half a
cosine to 0). `warmup_steps` ramps linearly from 1/warmup up to 1 for every scheduler but constant.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sdtune.errors import SdtuneError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def _rate(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SdtuneError(f"learning rate {whole!r}: {text!r} is not a number; use e.g. 1e-4 or "
                          "'0.005:100, 1e-3:1000, 1e-5'") from None
    if not math.isfinite(value) or value < 0:
        raise SdtuneError(f"learning rate {whole!r}: {text!r} must be a finite number >= 0")
    return value


def parse_lr(value: float | int | str) -> list[tuple[float, int | None]]:
    """[(rate, last step or None)], the pieces of a learning-rate setting. Raises a one-line SdtuneError."""
    if isinstance(value, bool):
        raise SdtuneError(f"learning rate {value!r} is not a number; use e.g. 1e-4")
    if isinstance(value, (int, float)):
        return [(_rate(repr(float(value)), str(value)), None)]
    whole = str(value)
    pieces = [p.strip() for p in whole.split(",")]
    if not whole.strip() or any(not p for p in pieces):
        raise SdtuneError(f"learning rate {whole!r} has an empty piece; use e.g. 1e-4 or "
                          "'0.005:100, 1e-3:1000, 1e-5'")
    out: list[tuple[float, int | None]] = []
    last_bound = 0
    for i, piece in enumerate(pieces):
        rate_text, sep, step_text = piece.partition(":")
        rate = _rate(rate_text.strip(), whole)
        bound = None
        if sep:
            if not re.fullmatch(r"\d+", step_text.strip()):
                raise SdtuneError(f"learning rate {whole!r}: {step_text.strip()!r} after ':' must be a step number")
            bound = int(step_text)
            if bound <= last_bound:
                raise SdtuneError(f"learning rate {whole!r}: step {bound} must be greater than the previous step "
                                  f"{last_bound}")
            last_bound = bound
        elif i != len(pieces) - 1:
            raise SdtuneError(f"learning rate {whole!r}: only the last rate may omit ':step' "
                              f"({piece!r} is not last)")
        out.append((rate, bound))
    return out


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate at each optimizer step (1-based)."""

    pieces: tuple[tuple[float, int | None], ...]
    scheduler: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1

    @classmethod
    def from_config(cls, lr: float | str, scheduler: str, warmup_steps: int, total_steps: int) -> LRSchedule:
        if scheduler not in SCHEDULERS:
            raise SdtuneError(f"unknown lr scheduler {scheduler!r}; use {', '.join(SCHEDULERS)}")
        return cls(tuple(parse_lr(lr)), scheduler, int(warmup_steps), max(1, int(total_steps)))

    @property
    def peak(self) -> float:
        return max(r for r, _ in self.pieces)

    def base(self, step: int) -> float:
        for rate, bound in self.pieces:
            if bound is None or step <= bound:
                return rate
        return self.pieces[-1][0]

    def factor(self, step: int) -> float:
        if self.scheduler == "constant":
            return 1.0
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.scheduler == "constant_with_warmup":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    def __call__(self, step: int) -> float:
        return self.base(step) * self.factor(step)


def parse_early_stop(value: str | int | None) -> tuple[int, float] | None:
    """"patience[,min_delta]" -> (patience, min_delta); None/""/0 -> None (off)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise SdtuneError(f"early_stop {value!r}: use 'patience[,min_delta]', e.g. '3' or '3,0.001'")
    if isinstance(value, int):
        value = str(value)
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) > 2 or not re.fullmatch(r"\d+", parts[0]):
        raise SdtuneError(f"early_stop {value!r}: use 'patience[,min_delta]', e.g. '3' or '3,0.001' (patience is "
                          "a whole number of evaluations)")
    patience = int(parts[0])
    delta = 0.0
    if len(parts) == 2:
        try:
            delta = float(parts[1])
        except ValueError:
            raise SdtuneError(f"early_stop {value!r}: min_delta {parts[1]!r} is not a number") from None
        if not math.isfinite(delta) or delta < 0:
            raise SdtuneError(f"early_stop {value!r}: min_delta must be a finite number >= 0")
    if patience == 0:
        return None
    return patience, delta
