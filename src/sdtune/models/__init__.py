"""Model loading: `tiny`, diffusers folders and single-file (A1111/LDM layout) checkpoints, all local only."""

from sdtune.models.device import resolve_device_dtype
from sdtune.models.family import FAMILIES, detect_family
from sdtune.models.loading import LoadedModel, load_model, normalize_prediction_type

__all__ = ["FAMILIES", "LoadedModel", "detect_family", "load_model", "normalize_prediction_type",
           "resolve_device_dtype"]
