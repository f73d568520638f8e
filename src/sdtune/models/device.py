"""Pick the torch device and dtype once, with user overrides, so every command behaves the same way."""

from __future__ import annotations

import torch

from sdtune.errors import SdtuneError

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _resolve_device(device: str | None) -> torch.device:
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise SdtuneError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SdtuneError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SdtuneError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s)); "
                              "use cuda:0")
    elif dev.type == "mps":
        if not _mps_available():
            raise SdtuneError(f"device {device!r} requested but MPS is not available; use --device cpu")
    elif dev.type != "cpu":
        raise SdtuneError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """Resolve "auto"/None and explicit names to a (device, dtype) pair.

    Auto: CUDA -> fp16, MPS -> fp16, CPU -> fp32 (half precision on CPU is slow and partly unsupported).
    Explicit: device "cpu" / "cuda" / "cuda:N" / "mps"; dtype "fp32" / "fp16" / "bf16" (bf16 only where supported).
    """
    dev = _resolve_device(device)
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return dev, (torch.float16 if dev.type in ("cuda", "mps") else torch.float32)
    if name not in _DTYPES:
        raise SdtuneError(f"unknown dtype {dtype!r}; use auto, fp32, fp16 or bf16")
    dt = _DTYPES[name]
    if dt == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SdtuneError("bf16 is not supported by this GPU; use --dtype fp16")
    if dt == torch.bfloat16 and dev.type == "mps":
        raise SdtuneError("bf16 is not supported on MPS; use --dtype fp16")
    if dt == torch.float16 and dev.type == "cpu":
        raise SdtuneError("fp16 is not supported on CPU (slow, missing kernels); use --dtype fp32 or bf16")
    return dev, dt
