"""Networks applied to the unconditional (negative) pass only: `--negative-lora FILE[:W]`.

Classifier-free guidance computes `uncond + cfg * (cond - uncond)`. A network that is active in the `uncond` pass
alone moves the image *away* from what it learned, as a negative prompt does, without touching the conditional
pass. The "wrong" LoRA recipe wants exactly that: a LoRA trained on bad images, on the side guidance subtracts.
A1111 has no way to say it (a `<lora:...>` tag applies to both passes; tags in the negative prompt are ignored).

How: during the base model's run, `unconditional_rows_with` replaces `unet.forward` with one that splits each
batched CFG call into its unconditional rows (first, as diffusers and `guidance.guided_unet` put them) and the rest,
and runs the first part inside the network's context (`LoraExtraNetwork.negative_pass`); the text encoder sees the
network while the negative prompt is encoded (`PromptEmbeds.with_negative_of`). The two UNet calls do the FLOPs of
one; their results differ from a single batched call only in the last bits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator


def _rows(value: Any, total: int, lo: int, hi: int) -> Any:
    import torch

    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
        return value[lo:hi]
    if isinstance(value, dict):
        return {k: _rows(v, total, lo, hi) for k, v in value.items()}
    return value


def _split_forward(original: Callable[..., Any], batch: int,
                   negative: Callable[[], ContextManager[Any]]) -> Callable[..., Any]:
    import torch

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        total = sample.shape[0]
        if total <= batch:  # no unconditional rows in this call (cfg <= 1)
            return original(sample, timestep, encoder_hidden_states, *args, **kwargs)

        def part(lo: int, hi: int) -> Any:
            return original(*(_rows(v, total, lo, hi) for v in (sample, timestep, encoder_hidden_states, *args)),
                            **{k: _rows(v, total, lo, hi) for k, v in kwargs.items()})

        with negative():
            first = part(0, batch)
        rest = part(batch, total)
        if isinstance(first, tuple):
            return (torch.cat([first[0], rest[0]]),) + tuple(first[1:])
        first.sample = torch.cat([first.sample, rest.sample])
        return first

    return forward


@contextmanager
def unconditional_rows_with(pipe: Any, batch: int, negative: Callable[[], ContextManager[Any]] | None) -> Iterator[None]:
    """While inside, the first `batch` rows of every UNet call (the unconditional ones) run inside `negative()`.
    A no-op when `negative` is None. Install it before `guided_unet` so the guided forward calls through it."""
    if negative is None:
        yield
        return
    unet = pipe.unet
    had_own = "forward" in vars(unet)
    previous = unet.forward
    unet.forward = _split_forward(previous, batch, negative)
    try:
        yield
    finally:
        if had_own:
            unet.forward = previous
        else:
            del unet.forward
