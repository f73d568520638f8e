"""Per-step conditioning for prompt editing and AND, applied by wrapping the UNet's forward during one run.

A plain prompt needs none of this: the pipeline gets its embeddings as usual. When the prompt has a schedule
(`[a:b:0.5]`, `[a|b]`) or several AND parts (or one part with a weight other than 1), `guided_unet` replaces
`pipe.unet.forward` for the duration of the run. Each UNet call then uses the conditioning of the current sampling
step and returns, in the place of the conditional prediction,

    combined = uncond + sum_i w_i * (cond_i - uncond)

so the pipeline's own CFG step gives A1111's `uncond + cfg * sum_i w_i * (cond_i - uncond)`. All parts and the
unconditional input go through the UNet as one batch. The step counter is advanced by the pipeline's
`callback_on_step_end` (`Guide.step_done`); samplers that call the UNet twice per step (Heun, DPM2) use the same
conditioning for both calls.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from sdtune.prompts.schedule import entry_for_step


@dataclass
class ScheduledCond:
    """One conditioning over the steps: `ends[k]` is the last step `embeds[k]` is used for (A1111's rule)."""

    ends: list[int]
    embeds: list[Any]            # [batch, tokens, D] each
    pooled: list[Any] = field(default_factory=list)  # [batch, Dp] each (SDXL), else empty
    weight: float = 1.0

    def at(self, step: int) -> tuple[Any, Any]:
        k = entry_for_step(self.ends, step)
        return self.embeds[k], (self.pooled[k] if self.pooled else None)


@dataclass
class GuidanceSchedule:
    uncond: ScheduledCond
    parts: list[ScheduledCond]


class Guide:
    """Holds the current step; `callback(pipe, i, t, kwargs)` is a diffusers `callback_on_step_end`."""

    def __init__(self, schedule: GuidanceSchedule | None, start: int = 0) -> None:
        self.schedule = schedule
        self.start = start
        self.step = start

    def step_done(self, i: int) -> None:
        self.step = self.start + i + 1


def _batch_part(value: Any, batch: int, first: bool) -> Any:
    import torch

    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != 2 * batch:
        return value
    return value[:batch] if first else value[batch:]


def _guided_forward(original: Any, guide: Guide) -> Any:
    import torch

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        sched = guide.schedule
        assert sched is not None  # guided_unet installs this forward only for a guide with a schedule
        uncond, uncond_pooled = sched.uncond.at(guide.step)
        batch = uncond.shape[0]
        cfg = sample.shape[0] == 2 * batch
        x = sample[batch:] if cfg else sample
        conds = [(p.weight, *p.at(guide.step)) for p in sched.parts]
        n = len(conds) + 1
        t = timestep
        if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == sample.shape[0]:
            t = torch.cat([t[:batch]] * n)
        added = kwargs.get("added_cond_kwargs")
        if added is not None:
            added = dict(added)
            if uncond_pooled is not None:
                added["text_embeds"] = torch.cat([uncond_pooled] + [c[2] for c in conds])
            if "time_ids" in added:
                ids = added["time_ids"]
                neg, pos = (_batch_part(ids, batch, True), _batch_part(ids, batch, False)) if cfg else (ids, ids)
                added["time_ids"] = torch.cat([neg] + [pos] * len(conds))
            kwargs["added_cond_kwargs"] = added
        hidden = torch.cat([uncond] + [c[1] for c in conds]).to(encoder_hidden_states.dtype)
        out = original(torch.cat([x] * n), t, hidden, *args, **kwargs)
        pred = out[0] if isinstance(out, tuple) else out.sample
        base = pred[:batch]
        combined = base + sum(w * (pred[(k + 1) * batch:(k + 2) * batch] - base) for k, (w, _, _) in enumerate(conds))
        result = torch.cat([base, combined]) if cfg else combined
        if isinstance(out, tuple):
            return (result,) + tuple(out[1:])
        out.sample = result
        return out

    return forward


@contextmanager
def guided_unet(pipe: Any, guide: Guide) -> Iterator[Guide]:
    """Route `pipe.unet`'s calls through the guide's schedule while inside the block (no-op without one)."""
    if guide.schedule is None:
        yield guide
        return
    unet = pipe.unet
    had_own = "forward" in vars(unet)
    previous = unet.forward
    unet.forward = _guided_forward(previous, guide)
    try:
        yield guide
    finally:
        if had_own:
            unet.forward = previous
        else:
            del unet.forward
