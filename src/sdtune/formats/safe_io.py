"""Safe reading and atomic writing of weight files.

Every weight file sdtune touches goes through here, so that bad input always ends in one clear SdtuneError:
safetensors headers are validated before anything is loaded, and pickles (.ckpt/.pt/.pth/.bin) are only ever
opened with `torch.load(weights_only=True)`, which refuses any pickle that would run code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from collections import OrderedDict
from typing import Any, Mapping

import torch

from sdtune.errors import SdtuneError

SAFETENSORS_EXTS = (".safetensors",)
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_EXTS = SAFETENSORS_EXTS + PICKLE_EXTS

_MAX_HEADER = 100 * 1024 * 1024  # real headers are a few MB at most
_MAX_HEADER_DEPTH = 64  # real headers nest 3 levels (tensor -> info -> shape); safetensors itself stops at 128
_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
              "U16", "U32", "U64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, known without loading its data."""

    shape: tuple[int, ...]
    dtype: str


def check_file(path: str | Path, exts: tuple[str, ...] = WEIGHT_EXTS) -> Path:
    """Return `path` as a Path if it is an existing regular file with a supported extension."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SdtuneError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise SdtuneError(f"{p} is a directory, but a weight file ({', '.join(exts)}) was expected; "
                          "pass the file inside it")
    if p.suffix.lower() not in exts:
        raise SdtuneError(f"{p.name}: unsupported file type {p.suffix or '(no extension)'!r}; "
                          f"expected one of {', '.join(exts)}")
    return p


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable / len(head) > 0.95


def _depth_over(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests lists/objects more than `limit` levels deep (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a .safetensors file's header and return (tensor infos, metadata) without reading tensor data.

    Catches text files renamed .safetensors, truncated downloads and corrupt headers before safetensors itself
    (whose errors are cryptic) ever sees the file."""
    p = check_file(path, SAFETENSORS_EXTS)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SdtuneError(f"{p.name} is not a valid .safetensors file ({size} bytes, too short); "
                              "re-download or re-export it")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n < 2:
            peek = head + f.read(504)
            what = "a text file" if _looks_like_text(peek) else "not a safetensors file"
            raise SdtuneError(f"{p.name} is {what} renamed .safetensors (no valid header); "
                              "use the real weight file")
        if 8 + n > size:
            raise SdtuneError(f"{p.name} is truncated (header says {n} bytes, file has {size - 8}); "
                              "the download or copy was incomplete, fetch it again")
        raw = f.read(n)
    too_deep = False
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SdtuneError(f"{p.name} has a corrupt safetensors header; re-download or re-export it") from None
    except RecursionError:  # nested deeper than Python's recursion limit
        too_deep = True
    if too_deep or _depth_over(header, _MAX_HEADER_DEPTH):
        raise SdtuneError(f"{p.name} has a corrupt safetensors header (JSON nested more than {_MAX_HEADER_DEPTH} "
                          "levels deep); it is not a real weight file, re-download or re-export it")
    if not isinstance(header, dict):
        raise SdtuneError(f"{p.name} has a corrupt safetensors header; re-download or re-export it")
    metadata_raw = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in metadata_raw.items()} if isinstance(metadata_raw, dict) else {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for key, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            ok = dtype in _ST_DTYPES and all(isinstance(s, int) and s >= 0 for s in shape) and 0 <= start <= stop
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SdtuneError(f"{p.name} has a corrupt safetensors header (entry {key!r}); re-download or re-export it")
        tensors[key] = TensorInfo(tuple(shape), dtype)
        end = max(end, stop)
    if 8 + n + end > size:
        raise SdtuneError(f"{p.name} is truncated ({size} bytes, needs {8 + n + end}); "
                          "the download or copy was incomplete, fetch it again")
    return tensors, metadata


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` string map of a .safetensors file (training settings, `ss_*` keys, modelspec ...)."""
    return read_safetensors_header(path)[1]


class _Stub:
    """Inert stand-in for harmless training-bookkeeping classes pickled into old checkpoints."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


def _stub(qualified: str) -> tuple[type, str]:
    module, _, name = qualified.rpartition(".")
    cls = type(name, (_Stub,), {"__module__": module, "__qualname__": name})
    return cls, qualified


# Classes that real SD checkpoints carry next to their weights (Lightning callbacks); they are replaced by inert
# stubs, never imported. Anything else that is not a tensor/container/primitive makes torch.load refuse the file.
_HARMLESS = [_stub("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
             _stub("lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")]


def _numpy_globals() -> list[Any]:
    try:
        import numpy as np
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover
        return []
    out: list[Any] = [(multiarray.scalar, "numpy.core.multiarray.scalar"), multiarray.scalar, np.dtype,
                      (np.dtype, "numpy.dtype")]
    for t in (np.float64, np.float32, np.int64, np.int32):
        out.append(type(np.dtype(t)))
    return out


def load_pickle(path: str | Path) -> Any:
    """Load a .ckpt/.pt/.pth/.bin with `torch.load(weights_only=True, map_location="cpu")`.

    A pickle that references code (os.system, arbitrary classes ...) is refused with an SdtuneError and nothing
    in it runs."""
    import pickle
    import zipfile

    p = check_file(path, PICKLE_EXTS)
    if p.stat().st_size == 0:
        raise SdtuneError(f"{p.name} is empty; re-download or re-export it")
    with open(p, "rb") as f:
        head = f.read(512)
    if _looks_like_text(head):
        raise SdtuneError(f"{p.name} is a text file, not a PyTorch checkpoint; use the real weight file")
    try:
        with torch.serialization.safe_globals(_HARMLESS + _numpy_globals()):
            try:
                return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) checkpoints cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        detail = f" ({detail[:160]})" if detail else ""
        raise SdtuneError(f"refusing to load {p.name}: the pickle contains code or non-tensor objects{detail}; "
                          "only load files you trust, ideally as .safetensors") from None
    except (EOFError, zipfile.BadZipFile, OSError, RuntimeError, ValueError, struct.error) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise SdtuneError(f"{p.name} is corrupt or truncated ({first}); re-download or re-export it") from None


def unwrap_state_dict(obj: Any) -> Any:
    """Return the weights of a checkpoint object: follows Lightning's `state_dict` (and `model`/`module`) nesting."""
    for _ in range(3):
        if isinstance(obj, Mapping):
            for key in ("state_dict", "model", "module"):
                inner = obj.get(key)
                if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                    obj = inner
                    break
            else:
                return obj
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read all tensors of a weight file onto the CPU, validating it first (see module docstring)."""
    p = check_file(path)
    if p.suffix.lower() in SAFETENSORS_EXTS:
        read_safetensors_header(p)
        from safetensors import SafetensorError, safe_open

        try:
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(p), framework="pt", device="cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    # safetensors hands out unaligned buffers; CPU kernels then take other (slower, numerically
                    # different) paths, so copy into allocator-aligned memory one tensor at a time
                    out[key] = t.clone() if t.data_ptr() % 64 else t
            return out
        except (SafetensorError, OSError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise SdtuneError(f"{p.name} could not be read ({first}); re-download or re-export it") from None
    obj = unwrap_state_dict(load_pickle(p))
    if not isinstance(obj, Mapping):
        raise SdtuneError(f"{p.name} holds a {type(obj).__name__}, not a dict of tensors; it is not a weight file")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise SdtuneError(f"{p.name} contains no tensors at its top level; run `sdtune info {p}` to see what it is")
    return sd


def read_shapes(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) of a weight file; for .safetensors this reads only the header."""
    p = check_file(path)
    if p.suffix.lower() in SAFETENSORS_EXTS:
        infos, meta = read_safetensors_header(p)
        return {k: v.shape for k, v in infos.items()}, meta
    return {k: tuple(v.shape) for k, v in read_state_dict(p).items()}, {}


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write a .safetensors file via a temp file in the same folder + os.replace, so a crash never leaves a
    half-written file under the final name."""
    from safetensors.torch import save_file

    from sdtune.atomic import atomic_path

    out = Path(path)
    clean: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses tensors that share or view a larger storage
        storages.add(t.untyped_storage().data_ptr())
        clean[k] = t
    with atomic_path(out) as tmp:
        save_file(clean, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return out


def save_torch_pickle_atomic(obj: Any, path: str | Path) -> Path:
    """Write a `.pt` / `.bin` that A1111's default safe unpickler accepts, atomically.

    A1111 (`modules/safe.py`) opens a zip `.pt` only if every entry is `<root>/data.pkl`, `<root>/version` or
    `<root>/data/<n>` (1.10 adds `byteorder`); torch 2.x's zip also holds `.format_version`, `.storage_alignment` and
    `.data/serialization_id`, so A1111 refuses it ("bad file inside ..."). torch's legacy (non-zip) format is read by
    every A1111 version (five pickles, checked with its restricted unpickler), by ComfyUI and kohya (torch.load), and
    by `torch.load(weights_only=True)`. bfloat16 storages are not on A1111's class whitelist: they are written as
    float32."""
    from sdtune.atomic import atomic_path

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu")
            return t.float() if t.dtype == torch.bfloat16 else t
        if isinstance(value, OrderedDict):
            return OrderedDict((k, plain(v)) for k, v in value.items())
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value)
        return value

    out = Path(path)
    with atomic_path(out) as tmp:
        torch.save(plain(obj), tmp, _use_new_zipfile_serialization=False)
    return out
