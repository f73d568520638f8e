"""LoHa/LoKr modules at generation time: a forward hook on each layer they cover adds `x -> weight * delta(x)`.

Why hooks and not PEFT adapters: PEFT's LoRA layers (the route of every other LoRA, `apply.py`) take only low-rank
factors, and an exact LoRA form of a Hadamard/Kronecker delta has up to the layer's full rank (SDXL: 4 to 16 GiB of
factors for common files). PEFT's own LoHa/LoKr layers would have to wrap the LoRA layers of other files on the
same module and take the file's shapes through their own factorisation rules. A hook is the whole LyCORIS "bypass"
forward in a few lines: the delta is computed from the file's few tensors at each call (as A1111's and ComfyUI's
formulas, `LycorisModule.delta`), used once and dropped, so the base weights are never modified and nothing stays in
memory but the file's tensors.

Per layer, the active files' deltas are summed in the order `set_active` is given (apply.py sorts by file hash, so
the same files and weights give the same bits in whatever order they were listed), times their weights, and applied
with the layer's own linear/conv arguments. A layer with no active file has no hook at all: weight 0 and "no LoRA"
are the base model bit for bit.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from sdtune.adapters.lora.loha_lokr import LycorisModule

Layer = torch.nn.Linear | torch.nn.Conv2d


class LycorisHooks:
    """The LoHa/LoKr modules loaded into one pipeline (per adapter name) and the hooks of the active ones."""

    def __init__(self) -> None:
        self.loaded: dict[str, dict[str, LycorisModule]] = {}  # adapter -> {canonical name: module on its device}
        self.layers: dict[str, Layer] = {}
        self.active: dict[str, list[tuple[LycorisModule, float]]] = {}  # canonical name -> (module, weight)
        self._handles: dict[str, Any] = {}

    def add(self, adapter: str, modules: Mapping[str, LycorisModule], layers: Mapping[str, Layer]) -> None:
        """Keep `modules` (moved to their layers' devices, float32) under `adapter`; nothing is applied yet."""
        own = {}
        for name, m in modules.items():
            layer = layers[name]
            self.layers[name] = layer
            own[name] = m.to(device=layer.weight.device, dtype=torch.float32)
        self.loaded[adapter] = own

    def remove(self, adapter: str) -> None:
        self.loaded.pop(adapter, None)

    def set_active(self, adapters: Sequence[tuple[str, Any]]) -> None:
        """Exactly these adapters with these weights, in this order; every other hook is removed. A weight is a
        number or has `.on(component)` (apply.LoraWeight: the module's component is its canonical name's first
        part); a module whose weight is 0 gets no hook."""
        active: dict[str, list[tuple[LycorisModule, float]]] = {}
        for adapter, weight in adapters:
            for name, m in self.loaded.get(adapter, {}).items():
                w = float(weight.on(name.split(".", 1)[0]) if hasattr(weight, "on") else weight)
                if w != 0:
                    active.setdefault(name, []).append((m, w))
        self.active = active
        for name in [n for n in self._handles if n not in active]:
            self._handles.pop(name).remove()
        for name in active:
            if name not in self._handles:
                self._handles[name] = self.layers[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def hook(layer: Layer, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            entries = self.active.get(name)
            if not entries or not args:
                return None
            x = args[0]
            delta: torch.Tensor | None = None
            for m, w in entries:  # files may give one layer flat [out, in*kh*kw] or [out, in, kh, kw]
                d = m.delta(torch.float32, multiplier=w).reshape(layer.weight.shape)
                delta = d if delta is None else delta.add_(d)
            assert delta is not None
            delta = delta.to(dtype=x.dtype, device=x.device)
            if isinstance(layer, torch.nn.Conv2d):
                extra = F.conv2d(x, delta, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            else:
                extra = F.linear(x, delta)
            return output + extra

        return hook

    def clear(self) -> None:
        self.set_active([])
        self.loaded.clear()
