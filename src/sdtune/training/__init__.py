"""Training: the data layer every trainer shares (`data`, `examples`, `images`, `captions`, `latents`), the one training loop
(`loop`: `train`, `Trainer`) with its config (`config.TrainConfig`), and the method plug-ins (`methods`)."""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TrainConfig": "sdtune.training.config",
    "Trainer": "sdtune.training.loop",
    "TrainResult": "sdtune.training.loop",
    "TrainingDiverged": "sdtune.training.loop",
    "EvalContext": "sdtune.training.sampling",
    "train": "sdtune.training.loop",
    "METHODS": "sdtune.training.methods",
    "TrainingMethod": "sdtune.training.methods",
    "register_method": "sdtune.training.methods",
}


def __getattr__(name: str) -> Any:  # lazy: `import sdtune.training.data` stays light
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
