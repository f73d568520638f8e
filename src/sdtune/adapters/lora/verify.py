"""The self-check that a written LoRA file means what was trained.

(From trained PEFT layers to a `LoraNetwork` and their deltas: `adapters.lora.from_peft`.)
`verify_lora_file(path, pipe_or_components, expected_deltas)` reloads the file through diffusers' own
`load_lora_weights` into the given model(s) under a temporary adapter name, requires that diffusers reported no
missing or unexpected keys, that exactly the expected modules received LoRA layers, and that every reloaded delta
(B @ A * scaling, by PEFT) equals the expected one; then removes the temporary adapter and restores the models'
adapter state. A trainer calls it after every save, so "lora key not loaded" is caught before a user sees it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from sdtune.adapters.lora.models import (
    components_of,
    lora_layers,
    unet_layout_of,
)
from sdtune.errors import SdtuneError

_VERIFY_ADAPTER = "sdtune_verify"
_TOL = {"F32": 1e-5, "F64": 1e-5, "F16": 5e-3, "BF16": 3e-2}


@dataclass
class VerifyResult:
    path: Path
    modules: int
    max_rel_error: float
    tolerance: float
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.path.name}: {self.modules} modules reload through diffusers with the trained deltas "
                f"(max relative error {self.max_rel_error:.2e}, tolerance {self.tolerance:.0e})")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_library_warnings() -> Iterator[list[str]]:
    """Collect warnings diffusers, transformers and PEFT emit (loggers and `warnings`) inside the block."""
    handler = _Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    saved = [(lg.level, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:  # collected, not printed: they are checked and reported by the caller
        lg.handlers = [handler]
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
        handler.messages.extend(str(w.message) for w in caught)
    finally:
        for lg, (level, handlers, propagate) in zip(loggers, saved):
            lg.handlers = handlers
            lg.propagate = propagate
            lg.setLevel(level)


def is_key_problem(message: str) -> bool:
    """Whether a diffusers/transformers/PEFT warning says that LoRA keys were not loaded."""
    m = message.lower()
    return any(p in m for p in ("unexpected keys", "missing keys", "not been correctly renamed",
                                "did not match any targeted module", "target modules", "were ignored"))


def pipeline_for(obj: Any) -> Any:
    """A diffusers pipeline (with LoRA loading) around the given pipeline / LoadedModel / components."""
    if hasattr(obj, "pipe") and hasattr(obj, "family"):
        return obj.pipe
    if hasattr(obj, "load_lora_weights"):
        return obj
    comps = components_of(obj)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if "text_encoder_2" in comps:
        return StableDiffusionXLPipeline(vae=None, text_encoder=comps.get("text_encoder"),
                                         text_encoder_2=comps["text_encoder_2"], tokenizer=None, tokenizer_2=None,
                                         unet=comps.get("unet"), scheduler=None)
    return StableDiffusionPipeline(vae=None, text_encoder=comps.get("text_encoder"), tokenizer=None,
                                   unet=comps.get("unet"), scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _adapter_state(comps: Mapping[str, Any]) -> dict[str, Any]:
    """Active adapters and requires_grad flags, to put back after a temporary adapter was loaded and deleted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state: dict[str, Any] = {"grad": {}, "active": {}, "disabled": {}}
    for comp, model in comps.items():
        for p in model.parameters():
            state["grad"][id(p)] = p.requires_grad
        for mod in model.modules():
            if isinstance(mod, BaseTunerLayer):
                state["active"][comp] = list(mod.active_adapters)
                state["disabled"][comp] = bool(mod.disable_adapters)
                break
    return state


def _restore_adapter_state(comps: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for comp, model in comps.items():
        active = state["active"].get(comp)
        for mod in model.modules():
            if isinstance(mod, BaseTunerLayer) and active:
                present = [a for a in active if a in getattr(mod, "lora_A", {})]
                if present:
                    mod.set_adapter(present)
                mod.enable_adapters(not state["disabled"].get(comp, False))
        for p in model.parameters():
            if id(p) in state["grad"]:
                p.requires_grad_(state["grad"][id(p)])


def _file_tolerance(path: Path) -> float:
    from sdtune.formats.safe_io import read_safetensors_header

    infos, _ = read_safetensors_header(path)
    dtypes = {i.dtype for k, i in infos.items() if not k.endswith(".alpha")}
    return max((_TOL.get(d, 3e-2) for d in dtypes), default=1e-5)


def _without_bundled_embeddings(path: Path) -> dict[str, torch.Tensor] | None:
    """The file's tensors without its bundled embeddings (`bundle_emb.*`, which diffusers' loader refuses), or None
    when it has none (then diffusers reads the file itself)."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        if not any(k.startswith("bundle_emb.") for k in keys):
            return None
        return {k: f.get_tensor(k) for k in keys if not k.startswith("bundle_emb.")}


def reloaded_deltas(path: str | Path, obj: Any, adapter: str = _VERIFY_ADAPTER
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load `path` with diffusers' `load_lora_weights` under `adapter`, return ({name: delta}, warnings) and remove
    the adapter again."""
    p = Path(path)
    pipe = pipeline_for(obj)
    comps = components_of(obj)
    state = _adapter_state(comps)
    try:
        from sdtune.models.loading import quiet_loading

        with capture_library_warnings() as messages, quiet_loading():
            try:
                bundled = _without_bundled_embeddings(p)
                if bundled is None:
                    pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=adapter)
                else:  # diffusers refuses bundle_emb.* keys ("Invalid LoRA checkpoint"): its users drop them
                    pipe.load_lora_weights(bundled, adapter_name=adapter)
            except (ValueError, KeyError, RuntimeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
                raise SdtuneError(f"{p.name} does not load with diffusers' load_lora_weights: {first}") from None
        deltas = {name: layer.get_delta_weight(a).detach().float().cpu()
                  for name, layer, a in lora_layers(comps, adapter)}
    finally:
        # peft warns that the deleted adapter "was active": it was, on purpose, for these few lines
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f"Adapter {adapter} was active")
            pipe.delete_adapters(adapter)
        _restore_adapter_state(comps, state)
    return deltas, list(messages)


def verify_lora_file(path: str | Path, pipe_or_components: Any,
                     expected_deltas: Mapping[str, torch.Tensor] | None = None, *,
                     tolerance: float | None = None) -> VerifyResult:
    """Self-check of a written LoRA file (see the module docstring); raises SdtuneError naming what is wrong.

    pipe_or_components: the model the LoRA was trained on, or any model of the same architecture (deltas do not
    depend on base weights). expected_deltas: from `lora_deltas_from_peft`; None compares against sdtune's own
    reading of the file (still catches keys diffusers drops or misplaces). tolerance: largest allowed
    max|reloaded - expected| / max|expected| per module; by default from the file's dtype (1e-5 fp32, 5e-3 fp16)."""
    p = Path(path)
    if expected_deltas is None:
        from sdtune.adapters.lora.io import read_lora

        expected_deltas = read_lora(p, layout=unet_layout_of(pipe_or_components)).deltas()
    tol = tolerance if tolerance is not None else _file_tolerance(p)
    got, messages = reloaded_deltas(p, pipe_or_components)
    problems: list[str] = []
    key_warnings = [m for m in messages if is_key_problem(m)]
    if key_warnings:
        problems.append("diffusers reported: " + " | ".join(w[:400] for w in key_warnings))
    missing = sorted(set(expected_deltas) - set(got))
    extra = sorted(n for n in set(got) - set(expected_deltas) if bool(got[n].any()))  # zero padding is fine
    if missing:
        problems.append(f"{len(missing)} trained module(s) got no LoRA layer in diffusers: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if extra:
        problems.append(f"{len(extra)} module(s) got a LoRA layer that was not trained: {', '.join(extra[:10])}")
    worst = 0.0
    bad: list[str] = []
    for name in sorted(set(got) & set(expected_deltas)):
        want = expected_deltas[name].float().cpu()
        have = got[name]
        if have.shape != want.shape:
            if have.numel() == want.numel():
                have = have.reshape(want.shape)
            else:
                bad.append(f"{name} (shape {list(have.shape)} vs {list(want.shape)})")
                continue
        scale = float(want.abs().max()) or 1.0
        err = float((have - want).abs().max()) / scale
        worst = max(worst, err)
        if not err <= tol:
            bad.append(f"{name} (relative error {err:.2e})")
    if bad:
        problems.append(f"{len(bad)} module(s) reload with different deltas: {', '.join(bad[:10])}")
    if problems:
        raise SdtuneError(f"{p.name} failed the LoRA self-check: " + "; ".join(problems))
    return VerifyResult(p, len(set(got) & set(expected_deltas)), worst, tol, messages)
