"""Hypernetworks on a loaded UNet, as a diffusers attention processor.

`HypernetworkProcessor` wraps each attention module's existing processor (AttnProcessor2_0 on PyTorch 2, so SDPA
attention is kept). When hypernetworks are active it hands the wrapped processor a view of the attention module
whose `to_k` and `to_v` first pass their input through the hypernetworks: `to_k(hn_k(context))`,
`to_v(hn_v(context))`, never `to_q`. The context is what the processor feeds to `to_k`/`to_v`: the text encoding
in cross-attention (attn2), the hidden states in self-attention (attn1), exactly A1111's `context = default(context,
x)`. The module pair used is chosen by the context's last dimension; a width the hypernetwork has no modules for
passes unchanged. Several hypernetworks are applied in sequence (list order), each with its own strength, as
A1111 does.

Strength 0 / no hypernetwork: bit-identical to the base model. An entry with strength 0 is skipped, and when no
entry is active the original processors are put back, so the UNet runs exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from sdtune.adapters.hypernetwork.network import Hypernetwork
from sdtune.adapters.stack import parse_weighted_specs
from sdtune.adapters.stack import per_pipeline
from sdtune.errors import SdtuneError
from sdtune.models.hashing import file_key

_ATTR = "_sdtune_hypernetworks"  # where a pipeline keeps its one stack (`per_pipeline`)
Spec = Any  # a path, a Hypernetwork, or (path | Hypernetwork, strength)


def attention_modules(unet: torch.nn.Module) -> dict[str, Any]:
    """name -> diffusers Attention module of the UNet."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


def context_widths(unet: torch.nn.Module) -> list[int]:
    """The widths of the contexts the UNet feeds to `to_k`/`to_v` (SD1: 320, 640, 768, 1280)."""
    return sorted({int(m.to_k.in_features) for m in attention_modules(unet).values()})


class Stack:
    """The active (hypernetwork, strength) entries of one UNet, applied in order."""

    def __init__(self) -> None:
        self.entries: list[tuple[Hypernetwork, float]] = []

    def transform(self, x: torch.Tensor, which: int) -> torch.Tensor:
        width = x.shape[-1]
        for hn, strength in self.entries:
            pair = hn.pair(width)
            if pair is not None:
                x = pair[which](x, strength)
        return x


class _Proj:
    """to_k / to_v with the hypernetworks in front (other attributes are the real projection's)."""

    def __init__(self, proj: Any, stack: Stack, which: int) -> None:
        self._proj, self._stack, self._which = proj, stack, which

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._proj(self._stack.transform(x, self._which), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proj, name)


class _AttnView:
    """The attention module as the wrapped processor sees it: everything forwarded, to_k/to_v replaced."""

    def __init__(self, attn: Any, stack: Stack) -> None:
        object.__setattr__(self, "_attn", attn)
        object.__setattr__(self, "to_k", _Proj(attn.to_k, stack, 0))
        object.__setattr__(self, "to_v", _Proj(attn.to_v, stack, 1))

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_attn"), name)


class HypernetworkProcessor:
    """Wraps an attention processor; applies the UNet's hypernetwork stack to the inputs of to_k and to_v."""

    def __init__(self, inner: Any, stack: Stack) -> None:
        self.inner = inner
        self.stack = stack

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        view = _AttnView(attn, self.stack) if self.stack.entries else attn
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(view, hidden_states, *args, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


def install(unet: torch.nn.Module, stack: Stack) -> None:
    """Wrap every attention processor of `unet` (idempotent)."""
    for m in attention_modules(unet).values():
        if not isinstance(m.processor, HypernetworkProcessor):
            m.processor = HypernetworkProcessor(m.processor, stack)
        else:
            m.processor.stack = stack


def uninstall(unet: torch.nn.Module) -> None:
    """Put the wrapped processors back."""
    for m in attention_modules(unet).values():
        if isinstance(m.processor, HypernetworkProcessor):
            m.processor = m.processor.inner


def check_fits(hn: Hypernetwork, unet: torch.nn.Module, name: str, model_name: str = "the model") -> None:
    """Refuse a hypernetwork that has no module for any of the UNet's context widths (made for another model)."""
    widths = context_widths(unet)
    if not set(hn.widths) & set(widths):
        raise SdtuneError(f"{name}: its layer widths ({', '.join(map(str, hn.widths))}) match none of "
                          f"{model_name}'s attention widths ({', '.join(map(str, widths))}); it was made for "
                          "another model family")


@dataclass
class LoadedHypernetwork:
    name: str
    path: Path | None
    hash: str | None
    network: Hypernetwork


def parse_hypernetwork_specs(specs: Iterable[Spec] | None) -> list[tuple[Any, float]]:
    return parse_weighted_specs(specs, Hypernetwork, "hypernetwork", "strength")


class PipelineHypernetworks:
    """Hypernetworks of one pipeline's UNet. `set([(path, 1.0), (path2, 0.5)])` loads what is new (each file
    once), and makes exactly these active in this order; `set([])` returns to the base model."""

    def __init__(self, pipe_or_loaded: Any, *, model_name: str | None = None) -> None:
        pipe = getattr(pipe_or_loaded, "pipe", pipe_or_loaded)
        self.pipe = pipe
        self.unet = pipe.unet
        self.model_name = model_name or getattr(pipe_or_loaded, "name", None) or "the model"
        self.stack = Stack()
        self.loaded: dict[tuple, LoadedHypernetwork] = {}
        self.active: list[tuple[LoadedHypernetwork, float]] = []

    @classmethod
    def for_pipeline(cls, pipe_or_loaded: Any, **kwargs: Any) -> "PipelineHypernetworks":
        pipe = getattr(pipe_or_loaded, "pipe", pipe_or_loaded)
        return per_pipeline(pipe, _ATTR, cls, lambda: cls(pipe_or_loaded, **kwargs))

    @classmethod
    def existing(cls, pipe_or_loaded: Any) -> "PipelineHypernetworks | None":
        """The pipeline's stack if anything ever used hypernetworks on it, else None (nothing was touched)."""
        found = getattr(getattr(pipe_or_loaded, "pipe", pipe_or_loaded), _ATTR, None)
        return found if isinstance(found, cls) else None

    def load(self, src: Any) -> LoadedHypernetwork:
        from sdtune.adapters.hypernetwork.io import read_hypernetwork
        from sdtune.adapters.hypernetwork.tags import hypernetwork_short_hash

        if isinstance(src, Hypernetwork):
            key: tuple = ("object", id(src))
            if key not in self.loaded:
                self._fit(src, src.name or "the hypernetwork")
                self.loaded[key] = LoadedHypernetwork(src.name or "hypernetwork", None, None, src)
            return self.loaded[key]
        path = Path(src).expanduser()
        if not path.is_file():
            raise SdtuneError(f"hypernetwork {src}: no such file")
        key = file_key(path)
        if key not in self.loaded:
            hn = read_hypernetwork(path)
            self._fit(hn, path.name)
            self.loaded[key] = LoadedHypernetwork(path.stem, path, hypernetwork_short_hash(path), hn)
        return self.loaded[key]

    def _fit(self, hn: Hypernetwork, name: str) -> None:
        check_fits(hn, self.unet, name, self.model_name)
        p = next(self.unet.parameters())
        hn.to(device=p.device)
        hn.eval()

    def set(self, specs: Iterable[Spec] | None) -> list[tuple[LoadedHypernetwork, float]]:
        entries = [(self.load(src), s) for src, s in parse_hypernetwork_specs(specs)]
        self.active = entries
        self.stack.entries = [(e.network, s) for e, s in entries if s != 0]
        if self.stack.entries:
            install(self.unet, self.stack)
        else:
            uninstall(self.unet)
        return list(self.active)

    def clear(self) -> None:
        self.set([])

    def describe(self) -> str:
        return ", ".join(f"{e.name}:{s:g}" for e, s in self.active) or "none"


def apply_hypernetworks(pipe_or_loaded: Any, specs: Sequence[Spec]) -> PipelineHypernetworks:
    """The pipeline's `PipelineHypernetworks` with `specs` active."""
    stack = PipelineHypernetworks.for_pipeline(pipe_or_loaded)
    stack.set(specs)
    return stack
