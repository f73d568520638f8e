"""Optional optimizers: 8-bit AdamW (bitsandbytes) and Prodigy (prodigyopt). Each is used only when its package
can be imported; otherwise `check_optimizer` stops the run before anything loads, saying what to install.

Prodigy estimates the step size itself: pass `--lr 1` (the learning rate then scales Prodigy's estimate)."""

from __future__ import annotations

import importlib
from typing import Any

from sdtune.errors import SdtuneError

PACKAGES = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes (needs a CUDA GPU)"),
            "prodigy": ("prodigyopt", "pip install prodigyopt")}


def check_optimizer(name: str) -> None:
    """Raise a one-line SdtuneError when the optional package behind `name` cannot be imported."""
    if name not in PACKAGES:
        return
    module, how = PACKAGES[name]
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or bitsandbytes failing to find its native library
        raise SdtuneError(f"optimizer {name} needs the {module} package, which cannot be imported here "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}); "
                          f"{how}, or use --optimizer adamw") from None


def make_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, weight_decay: float) -> Any:
    check_optimizer(name)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, weight_decay=weight_decay)
    raise SdtuneError(f"unknown optimizer {name!r}")
