"""The bundled `tiny` model: the one place that knows its name and where it lives inside the package.

Every `--model` / `model=` accepts the name `tiny` (any case); `is_bundled_model` is how code asks.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError

BUNDLED_MODEL = "tiny"


def is_bundled_model(spec: Any) -> bool:
    """Whether a model spec (None counts: it means the default) names the bundled model."""
    return spec is None or str(spec).strip().lower() == BUNDLED_MODEL


def assets_folder() -> Path:
    """The package's assets folder (where the bundled model is installed)."""
    return Path(str(resources.files("sdtune") / "assets"))


def bundled_model_path(*, check: bool = True) -> Path:
    """The bundled model's diffusers folder; with `check`, a one-line error if it is missing from the install."""
    path = assets_folder() / BUNDLED_MODEL
    if check and not (path / "model_index.json").is_file():
        raise SdtuneError(f"the bundled tiny model is missing ({path}); build it with `sdtune toy build-tiny` "
                          "or reinstall sdtune")
    return path
