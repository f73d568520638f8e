"""Several LoRAs on a loaded pipeline, each with its own weight, switched on/off/re-weighted between images without
reloading the base model.

Route: diffusers/PEFT adapters. Each LoRA file is read and validated by sdtune (unknown keys, NaN, alpha 0, family,
module names and shapes against this model), converted to the diffusers/PEFT layout with its alpha in the LoraConfig,
and handed to diffusers' own loaders (`load_lora_into_unet` / `load_lora_into_text_encoder`) under its own adapter
name. Weights are set on the PEFT layers exactly as diffusers' `set_adapters` does (active adapter list +
`set_scale`), per layer, so LoRAs that cover different modules or components mix freely.

Why this route rather than sdtune's own weight patching: the adapters are the same code path diffusers users and
`verify_lora_file` exercise, switching is free (no weight copies, no recomputation), and the base weights are never
modified, so nothing can drift after many switches.

Weight 0 is bit-identical to the base model: a LoRA whose weight is 0 is left out of the active adapter list, so its
layers are not computed at all, and a layer with no active LoRA runs only its base layer (PEFT's disabled path),
the same operation as before any LoRA was loaded. Active LoRAs are summed in a fixed order (file hash, then name),
so the same LoRAs and weights give the same bits in whatever order they are listed.

LyCORIS LoHa/LoKr modules of a file take a second route beside the adapters, `lycoris_hooks.py` (their deltas have
no low-rank form); the same adapter name, weights, order and weight-0 rule apply to them.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from sdtune.adapters.lora.models import (
    LoraTarget,
    adapter_names,
    components_of,
    guess_family,
    lora_layers,
    target_modules,
    unet_layout_of,
)
from sdtune.adapters.lora.loha_lokr import LycorisModule
from sdtune.adapters.lora.network import LoraNetwork, check_family
from sdtune.adapters.lora.weight import LoraWeight
from sdtune.adapters.stack import parse_weighted_specs
from sdtune.adapters.stack import per_pipeline
from sdtune.errors import SdtuneError
from sdtune.models.hashing import file_key

log = logging.getLogger(__name__)

LoraSpec = Any  # a path, a LoraNetwork, or (path | LoraNetwork, weight)


def check_compatible(net: LoraNetwork, family: str | None, modules: Mapping[str, LoraTarget],
                     model_name: str = "the model") -> None:
    """Refuse a LoRA made for another family, or whose modules do not exist / do not fit in this model."""
    name = Path(net.source).name if net.source else "the LoRA"
    check_family(net.family, family, name, model_name)
    every = net.all_modules()
    missing = sorted(n for n in every if n not in modules)
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise SdtuneError(f"{name}: {len(missing)} of its {len(every)} modules match no layer of {model_name} "
                          f"(a LoRA for a different model architecture?): {shown}")
    bad = []
    for n, m in every.items():
        weight = modules[n].weight
        want = tuple(weight.shape)
        have = m.weight_shape()
        flat_conv = isinstance(m, LycorisModule) and len(have) == 2 and len(want) == 4 and have[0] == want[0] \
            and have[1] == math.prod(want[1:])  # a LoHa/LoKr conv whose file leaves the kernel to the layer
        if have != want and not flat_conv and not (len(want) == 4 and want[2:] == (1, 1) and have == want[:2]) \
                and not (len(have) == 4 and have[2:] == (1, 1) and have[:2] == want):
            bad.append(f"{n} (LoRA {list(have)}, model {list(want)})")
    if bad:
        raise SdtuneError(f"{name}: {len(bad)} module(s) do not fit {model_name}'s layers (a LoRA for another model "
                          f"size?): {', '.join(bad[:6])}" + (" ..." if len(bad) > 6 else ""))


def _fit(net: LoraNetwork, modules: Mapping[str, LoraTarget]) -> LoraNetwork:
    """Reshape linear factors for 1x1-conv layers and vice versa (SD1 proj_in is a conv, SD2's a linear)."""
    from sdtune.adapters.lora.network import LoraModule

    out = {}
    for n, m in net.modules.items():
        w = modules[n].weight
        if w.ndim == 4 and m.down.ndim == 2:
            m = LoraModule(m.down[:, :, None, None], m.up[:, :, None, None], m.alpha)
        elif w.ndim == 2 and m.down.ndim == 4:
            m = LoraModule(m.down.flatten(1), m.up.flatten(1), m.alpha)
        out[n] = m
    return LoraNetwork(out, net.family, net.metadata, net.unet_layout, net.source, net.unknown_keys,
                       lycoris=dict(net.lycoris))


@dataclass
class LoadedLora:
    """A LoRA loaded into a pipeline as adapter `adapter`. name: A1111's name (file stem); hash: A1111's short hash."""

    adapter: str
    name: str
    path: Path | None
    hash: str | None
    modules: int
    components: tuple[str, ...]
    key: tuple | None = None
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # bundled in the file


def _inject_text_encoder(model: torch.nn.Module, comp: str, sd: Mapping[str, torch.Tensor],
                         config: Mapping[str, Any], adapter: str) -> None:
    """A text-encoder LoRA through peft's own API. diffusers' `load_lora_into_text_encoder` goes through
    transformers' PEFT integration, which pins peft versions of its own (transformers 5.25 refuses peft < 0.22);
    peft alone gives the same layers and weights, so generation does not depend on that layer."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    prefix = comp + "."
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not any(name.startswith("text_model.") for name, _ in model.named_modules()):  # transformers 5 CLIP layout
        own = {k.removeprefix("text_model."): v for k, v in own.items()}
    inject_adapter_in_model(LoraConfig(**config), model, adapter_name=adapter)
    result = set_peft_model_state_dict(model, own, adapter_name=adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"unexpected keys in the {comp} LoRA: {', '.join(unexpected[:5])}")


def parse_lora_specs(loras: Iterable[LoraSpec] | None) -> list[tuple[Any, float]]:
    return parse_weighted_specs(loras, LoraNetwork, "LoRA", "weight")


def _weighted(loras: Iterable[LoraSpec] | None) -> list[tuple[Any, LoraWeight]]:
    """`parse_lora_specs`, where a weight may also be a LoraWeight (a tag's separate text-encoder/UNet weights)."""
    items = list(loras or [])
    split = {i: item[1] for i, item in enumerate(items)
             if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], LoraWeight)}
    plain = parse_lora_specs([(item[0], 1.0) if i in split else item for i, item in enumerate(items)])
    return [(src, split[i] if i in split else LoraWeight.of(w)) for i, (src, w) in enumerate(plain)]


class PipelineLoras:
    """LoRAs of one pipeline. `set([(path, 0.8), (path2, 0.5)])` loads what is new (each file once), sets the
    weights, and switches everything else off; `set([])` returns to the base model. LoRAs stay loaded (inactive)
    after they leave the list, so switching back is free; `unload()` removes them."""

    def __init__(self, pipe_or_loaded: Any, *, family: str | None = None, model_name: str | None = None) -> None:
        from sdtune.adapters.lora.verify import pipeline_for

        self.pipe = pipeline_for(pipe_or_loaded)
        self.family = family or guess_family(pipe_or_loaded)
        self.model_name = model_name or getattr(pipe_or_loaded, "name", None) or "the model"
        self.loaded: dict[str, LoadedLora] = {}  # adapter -> LoadedLora
        self.active: list[tuple[LoadedLora, LoraWeight]] = []
        self._by_key: dict[tuple, str] = {}
        self._count = 0
        from sdtune.adapters.lora.lycoris_hooks import LycorisHooks

        self.lycoris = LycorisHooks()  # the LoHa/LoKr modules of the loaded files

    @classmethod
    def for_pipeline(cls, pipe_or_loaded: Any, **kwargs: Any) -> "PipelineLoras":
        """The one PipelineLoras of a pipeline (created on first use): LoRA state lives in the pipeline's layers,
        so everything that uses the pipeline shares it."""
        from sdtune.adapters.lora.verify import pipeline_for

        return per_pipeline(pipeline_for(pipe_or_loaded), "_sdtune_loras", cls, lambda: cls(pipe_or_loaded, **kwargs))

    # -- loading ----------------------------------------------------------------------------------------------

    def _read(self, src: Any) -> tuple[LoraNetwork, Path | None]:
        from sdtune.adapters.lora.io import read_lora

        if isinstance(src, LoraNetwork):
            return src, Path(src.source) if src.source else None
        path = Path(src).expanduser()
        return read_lora(path, layout=unet_layout_of(self.pipe), expect_family=self.family,
                         model_name=self.model_name), path

    def load(self, src: Any, name: str | None = None) -> LoadedLora:
        """Load a LoRA file (or LoraNetwork) as a new, inactive adapter; a file already loaded is reused."""
        key = None
        if not isinstance(src, LoraNetwork):
            file = Path(src).expanduser()
            if not file.is_file():
                raise SdtuneError(f"LoRA {src}: no such file")
            key = file_key(file)
            if key in self._by_key:
                return self.loaded[self._by_key[key]]
        net, path = self._read(src)
        bundled = net.embeddings  # _fit below returns the modules only
        modules = target_modules(self.pipe)
        check_compatible(net, self.family, modules, self.model_name)
        net = _fit(net, modules)
        display = name or (path.stem if path else f"lora{self._count + 1}")
        taken = set(adapter_names(self.pipe))
        while True:
            self._count += 1
            adapter = f"sdtune{self._count}_" + re.sub(r"[^0-9A-Za-z_]", "_", display)[:40]
            if adapter not in taken:
                break
        if net.modules:
            self._inject(net, adapter)
        if net.lycoris:
            self.lycoris.add(adapter, net.lycoris, modules)
        got = {n for n, _, _ in lora_layers(self.pipe, adapter)}
        lost = sorted(set(net.modules) - got)
        if lost:
            self._delete(adapter)
            raise SdtuneError(f"{display}: diffusers did not attach {len(lost)} module(s): {', '.join(lost[:10])}")
        from sdtune.adapters.lora.tags import lora_short_hash

        lora = LoadedLora(adapter=adapter, name=display, path=path, modules=len(net.all_modules()),
                          hash=lora_short_hash(path) if path is not None and path.is_file() else None,
                          components=tuple(net.components), key=key, embeddings=dict(bundled))
        self.loaded[adapter] = lora
        if key is not None:
            self._by_key[key] = adapter
        self._apply()  # the new adapter stays inactive until it is in the active list
        return lora

    def _inject(self, net: LoraNetwork, adapter: str) -> None:
        from sdtune.adapters.lora.diffusers_format import flat_adapter_metadata, network_to_diffusers
        from sdtune.adapters.lora.verify import capture_library_warnings
        from sdtune.models.loading import quiet_loading

        sd, configs = network_to_diffusers(net)
        meta = flat_adapter_metadata(configs)
        cls = type(self.pipe)
        comps = components_of(self.pipe)
        with capture_library_warnings() as messages, quiet_loading():
            try:
                if "unet" in configs:
                    cls.load_lora_into_unet(sd, network_alphas=None, unet=comps["unet"], adapter_name=adapter,
                                            _pipeline=self.pipe, metadata=meta)
                for comp in ("text_encoder", "text_encoder_2"):
                    if comp in configs:
                        _inject_text_encoder(comps[comp], comp, sd, configs[comp], adapter)
            except (ValueError, KeyError, RuntimeError) as exc:
                self._delete(adapter)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise SdtuneError(f"diffusers could not load {Path(net.source).name or 'the LoRA'}: {first}") from None
        from sdtune.adapters.lora.verify import is_key_problem

        problems = [m for m in messages if is_key_problem(m)]
        if problems:
            self._delete(adapter)
            raise SdtuneError(f"diffusers reported while loading {Path(net.source).name or 'the LoRA'}: "
                              + " | ".join(p[:300] for p in problems))

    def _delete(self, adapter: str) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.lycoris.remove(adapter)
        self.lycoris.set_active([(a, w) for a, w in self._on() if a != adapter])
        for model in components_of(self.pipe).values():
            for mod in list(model.modules()):
                if isinstance(mod, BaseTunerLayer) and adapter in getattr(mod, "lora_A", {}):
                    mod.delete_adapter(adapter)
            cfg = getattr(model, "peft_config", None)
            if isinstance(cfg, dict):
                cfg.pop(adapter, None)

    # -- weights ----------------------------------------------------------------------------------------------

    def set(self, loras: Iterable[LoraSpec] | None) -> list[tuple[LoadedLora, LoraWeight]]:
        """Make exactly these LoRAs active with these weights (a weight of 0 keeps a LoRA loaded but off); a weight
        is a number or a LoraWeight (separate text-encoder and UNet multipliers)."""
        specs = _weighted(loras)
        entries = [(self.load(src), w) for src, w in specs]
        seen: dict[str, int] = {}
        merged: list[tuple[LoadedLora, LoraWeight]] = []
        for lora, w in entries:  # the same file twice: weights add up, as two A1111 tags would
            if lora.adapter in seen:
                i = seen[lora.adapter]
                merged[i] = (lora, merged[i][1] + w)
            else:
                seen[lora.adapter] = len(merged)
                merged.append((lora, w))
        self.active = merged
        self._apply()
        return list(self.active)

    def clear(self) -> None:
        """All LoRAs off (still loaded): the base model's exact outputs."""
        self.set([])

    def unload(self) -> None:
        """Remove every loaded LoRA from the pipeline."""
        for adapter in list(self.loaded):
            self._delete(adapter)
        self.loaded.clear()
        self._by_key.clear()
        self.active = []

    def _on(self) -> list[tuple[str, LoraWeight]]:
        """(adapter, weight) of the active LoRAs with a non-zero weight, in a fixed order (by file hash, then
        name), so the same LoRAs and weights give the same bits however they were listed or loaded (float addition
        is not associative)."""
        ordered = sorted(self.active, key=lambda e: (e[0].hash or "", e[0].name, e[0].adapter))
        return [(lora.adapter, w) for lora, w in ordered if w]

    def _apply(self) -> None:
        from peft.tuners.lora import LoraLayer

        on = self._on()
        self.lycoris.set_active(on)
        for component, model in components_of(self.pipe).items():
            weights = [(a, w.on(component)) for a, w in on if w.on(component) != 0]
            for mod in model.modules():
                if not isinstance(mod, LoraLayer):
                    continue
                here = [(a, w) for a, w in weights if a in mod.lora_A]
                if not here:
                    mod.enable_adapters(False)
                    continue
                mod.enable_adapters(True)
                mod.set_adapter([a for a, _ in here], inference_mode=True)
                for a, w in here:
                    mod.set_scale(a, w)

    # -- reporting --------------------------------------------------------------------------------------------

    def infotext_entries(self) -> list[tuple[str, str]]:
        """(name, short hash) of the active LoRAs with a non-zero weight, for A1111's `Lora hashes` field."""
        return [(lora.name, lora.hash) for lora, w in self.active if w and lora.hash]

    def describe(self) -> str:
        return ", ".join(f"{lora.name}:{w:g}" for lora, w in self.active) or "none"


def apply_loras(pipe_or_loaded: Any, loras: Sequence[LoraSpec], **kwargs: Any) -> PipelineLoras:
    """One-shot helper: a `PipelineLoras` for the pipeline with `loras` set."""
    stack = PipelineLoras(pipe_or_loaded, **kwargs)
    stack.set(loras)
    return stack
