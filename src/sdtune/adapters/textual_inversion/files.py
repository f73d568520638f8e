"""Textual-inversion embedding files: read every common layout, write each of them.

One in-memory form, `Embedding`: a name and n vectors per text encoder, keyed like `prompts.EmbeddingRegistry`
("clip_l" SD1 / SDXL's first encoder, "clip_h" SD2, "clip_g" SDXL's second encoder). A bare tensor of a file is
keyed by its width: 768 -> clip_l, 1024 -> clip_h, 1280 -> clip_g, any other width (the toy models' 64) -> "*",
which serves any encoder of that width.

Layouts read (`read_embedding`, one call for all):

| layout | tensors | where from |
| --- | --- | --- |
| A1111 .pt | `string_to_param: {"*": [n, d]}`, `string_to_token`, `name`, `step`, `sd_checkpoint(_name)` | A1111 |
| kohya / A1111 safetensors | `emb_params: [n, d]` | kohya, Civitai, sdtune (default, SD1/SD2) |
| diffusers | `{token: [n, d] or [d]}` (.safetensors or .bin) | diffusers' textual_inversion example |
| diffusers SDXL pair | `learned_embeds(-steps-N).safetensors` {token: [n, 768]} + `learned_embeds_2...` {token: [n, 1280]} in one folder, read as one clip_l/clip_g embedding named after the token (`diffusers_pair.py`) | diffusers' textual_inversion_sdxl example |
| SDXL | `clip_l: [n, 768]`, `clip_g: [n, 1280]` | A1111, kohya, ComfyUI, sdtune (SDXL) |
| A1111 PNG | base64 of JSON of the A1111 dict in the `sd-ti-embedding` text chunk, tensors as {"TORCHTENSOR": list}; without the chunk, the same JSON hidden in the pixels (`image_data.py`) | A1111 |

Pickles are opened only with `torch.load(weights_only=True)` (`formats.safe_io.load_pickle`); the .pt files written
here hold only dicts, strings, ints and tensors, so that works for them and for A1111.

Names follow A1111: the name in a prompt is the file's stem (for a PNG, the `name` stored in it). The token a file
was trained with (sdtune metadata, A1111's `name`, a diffusers key) is kept as `token`; `EmbeddingLibrary` makes it
usable as a second name.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from sdtune.errors import SdtuneError

WIDTH_KEYS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
KEY_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}
FAMILY_KEYS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
# A1111 reads SDXL embeddings only as .safetensors with clip_l [n, 768] and clip_g [n, 1280] (as ComfyUI does);
# a .pt or PNG embedding of SDXL crashes its loader ('str' object has no attribute 'detach')
SDXL_REFUSED = {fmt: f"an SDXL embedding as {fmt} does not load in A1111; write format safetensors (or sdxl): "
                     "clip_l + clip_g in a .safetensors, which A1111, ComfyUI and diffusers read"
                for fmt in ("a1111", "png")}
FORMATS = ("safetensors", "diffusers", "a1111", "kohya", "sdxl", "png")
FORMAT_EXT = {"safetensors": ".safetensors", "diffusers": ".safetensors", "a1111": ".pt", "kohya": ".safetensors",
              "sdxl": ".safetensors", "png": ".png"}
EMBEDDING_EXTS = (".safetensors", ".pt", ".bin", ".pth", ".ckpt", ".png", ".webp")
PNG_CHUNK = "sd-ti-embedding"
A1111_TOKEN_ID = 265  # the id of "*" in CLIP's vocabulary, what A1111 stores in string_to_token


@dataclass
class Embedding:
    """n vectors per encoder key, e.g. {"clip_l": [n, 768], "clip_g": [n, 1280]} or {"*": [n, 64]}."""

    name: str
    vectors: dict[str, torch.Tensor]
    token: str | None = None          # the token it was trained as, when the file says
    step: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    layout: str = ""                  # the layout it was read from (see module docstring)

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    def shapes(self) -> str:
        return ", ".join(f"{k}: [{v.shape[0]}, {v.shape[1]}]" for k, v in self.vectors.items())

    def single(self) -> torch.Tensor:
        """The one tensor of a single-encoder embedding."""
        if len(self.vectors) != 1:
            raise SdtuneError(f"embedding {self.name!r} has vectors for {', '.join(self.vectors)}; this layout holds "
                              "one tensor (write SDXL embeddings as sdxl/safetensors)")
        return next(iter(self.vectors.values()))

    def is_sdxl(self) -> bool:
        return set(self.vectors) == {"clip_l", "clip_g"}


def key_for_width(width: int) -> str:
    return WIDTH_KEYS.get(int(width), "*")


def _as_2d(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim not in (1, 2) or t.numel() == 0:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise SdtuneError(f"{what}: expected a float tensor [n, width], found {shape}")
    t = t.detach().to("cpu", torch.float32)
    t = t.reshape(1, -1) if t.ndim == 1 else t
    if not torch.isfinite(t).all():
        raise SdtuneError(f"{what}: the vectors contain NaN or infinity")
    return t.contiguous()


def from_dict(data: Mapping[str, Any], name: str, *, meta: Mapping[str, str] | None = None,
              source: str = "embedding") -> Embedding:
    """Interpret a loaded dict in any of the layouts of the module docstring."""
    meta = dict(meta or {})
    raw_step: Any = meta.get("sdtune_step")  # a string, or the file's own value (made an int at the end)
    token = meta.get("sdtune_ti_token")
    if isinstance(data.get("string_to_param"), Mapping):
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        param_tensors = [v for v in params.values() if isinstance(v, torch.Tensor)]
        if len(param_tensors) != 1:
            raise SdtuneError(f"{source}: string_to_param holds {len(param_tensors)} tensors; an A1111 embedding "
                              "has one")
        t = _as_2d(param_tensors[0], source)
        vectors, layout = {key_for_width(t.shape[1]): t}, "a1111"
        token = token or (data.get("name") if isinstance(data.get("name"), str) else None)
        raw_step = data.get("step", raw_step)
    elif "clip_l" in data and "clip_g" in data:
        vectors = {k: _as_2d(data[k], f"{source} ({k})") for k in ("clip_l", "clip_g")}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise SdtuneError(f"{source}: clip_l has {vectors['clip_l'].shape[0]} vectors but clip_g has "
                              f"{vectors['clip_g'].shape[0]}")
        layout = "sdxl"
        raw_step = data.get("step", raw_step) if not isinstance(data.get("step"), torch.Tensor) else raw_step
        if isinstance(data.get("name"), str):
            token = token or data["name"]
    elif isinstance(data.get("emb_params"), torch.Tensor):
        t = _as_2d(data["emb_params"], source)
        vectors, layout = {key_for_width(t.shape[1]): t}, "kohya"
    else:
        tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            found = ", ".join(list(tensors)[:5]) or "no tensors"
            raise SdtuneError(f"{source} is not a textual-inversion embedding (found {found}); expected "
                              "string_to_param, emb_params, clip_l/clip_g or one {token: tensor}")
        key, t = next(iter(tensors.items()))
        t = _as_2d(t, source)
        vectors, layout = {key_for_width(t.shape[1]): t}, "diffusers"
        token = token or key
    step: int | None
    try:
        step = int(raw_step) if raw_step is not None else None
    except (TypeError, ValueError):
        step = None
    return Embedding(name=name, vectors=vectors, token=token, step=step, metadata=meta, layout=layout)


# ------------------------------------------------------------------------------------------------------ PNG


def _tensor_json(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return {"TORCHTENSOR": obj.detach().cpu().float().tolist()}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _tensor_hook(d: dict) -> Any:
    if "TORCHTENSOR" in d:
        return torch.tensor(d["TORCHTENSOR"], dtype=torch.float32)
    return d


def png_payload(data: Mapping[str, Any]) -> str:
    """A1111's PNG chunk text: base64 of the JSON of the embedding dict, tensors as {"TORCHTENSOR": nested list}."""
    return base64.b64encode(json.dumps(data, default=_tensor_json).encode("utf-8")).decode("ascii")


def read_png_data(path: Path) -> tuple[dict | None, dict[str, str]]:
    """(the embedding dict stored in an image's `sd-ti-embedding` chunk or, when the chunk is absent, in its pixels
    as A1111 stores it there; None for an ordinary image, sdtune's metadata)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from sdtune.adapters.textual_inversion.image_data import extract_payload

    pixel_data: Any = None
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
            text.update({k: v for k, v in im.info.items() if isinstance(v, str)})
            if PNG_CHUNK not in text:  # stripped chunk: A1111 reads the copy in the pixels
                pixel_data = extract_payload(np.asarray(im.convert("RGB")), _tensor_hook)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise SdtuneError(f"{path.name} could not be read as an image ({exc})") from None
    meta: dict[str, str] = {}
    try:
        meta = {str(k): str(v) for k, v in json.loads(text.get("sdtune_metadata", "{}")).items()}
    except (ValueError, AttributeError):
        meta = {}
    payload = text.get(PNG_CHUNK)
    if payload is None:
        return (pixel_data if isinstance(pixel_data, dict) and "string_to_param" in pixel_data else None), meta
    try:
        data = json.loads(base64.b64decode(payload), object_hook=_tensor_hook)
    except (ValueError, TypeError) as exc:
        raise SdtuneError(f"{path.name}: its {PNG_CHUNK} chunk is not valid base64 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SdtuneError(f"{path.name}: its {PNG_CHUNK} chunk holds no embedding")
    return data, meta


# ------------------------------------------------------------------------------------------------------ reading


def read_embedding(path: str | Path) -> Embedding:
    """Read an embedding in any layout (see module docstring). The name is the file's stem (a PNG's stored name;
    a diffusers SDXL pair's token, whichever of its two files `path` names)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SdtuneError(f"{p}: no such embedding file")
    ext = p.suffix.lower()
    if ext not in EMBEDDING_EXTS:
        raise SdtuneError(f"{p.name}: not an embedding file type; expected one of {', '.join(EMBEDDING_EXTS)}")
    from sdtune.adapters.textual_inversion.diffusers_pair import pair_of

    pair = pair_of(p)
    if pair is not None:
        return _read_pair(*pair)
    return _read_one(p)


def _read_pair(first: Path, second: Path) -> Embedding:
    """diffusers' SDXL pair as one embedding: clip_l from the text_encoder_1 file, clip_g from the other (by role,
    so any widths the model has), named after the token both files store."""
    one, two = _read_one(first), _read_one(second)
    where = f"{first.name} + {second.name}"
    if len(one.vectors) != 1 or len(two.vectors) != 1:
        raise SdtuneError(f"{where}: each file of a diffusers SDXL pair holds one tensor {{token: [n, width]}}")
    l, g = one.single(), two.single()
    if l.shape[0] != g.shape[0]:
        raise SdtuneError(f"{where}: {l.shape[0]} vectors for CLIP-L but {g.shape[0]} for OpenCLIP-G; the two files "
                          "come from different runs")
    token = one.token or two.token
    name = file_stem_for(token) if token else first.parent.name
    steps = first.stem[len("learned_embeds"):]  # "-steps-N" for an intermediate save, else ""
    if steps:  # its own name; the trained token stays with the final pair in the same folder
        name, token = name + steps, None
    emb = Embedding(name=name, vectors={"clip_l": l, "clip_g": g}, token=token, step=one.step,
                    metadata=dict(one.metadata), layout="diffusers-sdxl-pair")
    emb.path = first
    return emb


def _read_one(p: Path) -> Embedding:
    from sdtune.formats.safe_io import SAFETENSORS_EXTS, load_pickle, read_safetensors_metadata, read_state_dict

    ext = p.suffix.lower()
    if ext in (".png", ".webp"):
        data, meta = read_png_data(p)
        if data is None:
            raise SdtuneError(f"{p.name} is an image without an embedding (no {PNG_CHUNK} chunk, no embedding data "
                              "in its pixels)")
        png_name = data.get("name")
        name = png_name if isinstance(png_name, str) and png_name else p.stem
        emb = from_dict(data, name, meta=meta, source=p.name)
        emb.token = meta.get("sdtune_ti_token", emb.token)
        emb.layout = "png"
    elif ext in SAFETENSORS_EXTS:
        tensors = read_state_dict(p)
        emb = from_dict(tensors, p.stem, meta=read_safetensors_metadata(p), source=p.name)
    else:
        raw = load_pickle(p)
        if not isinstance(raw, Mapping):
            raise SdtuneError(f"{p.name} holds a {type(raw).__name__}, not an embedding")
        meta = {}
        if isinstance(raw.get("sdtune_metadata"), str):
            try:
                meta = {str(k): str(v) for k, v in json.loads(raw["sdtune_metadata"]).items()}
            except (ValueError, AttributeError):
                meta = {}
        emb = from_dict(raw, p.stem, meta=meta, source=p.name)
    emb.path = p
    return emb


# ------------------------------------------------------------------------------------------------------ writing


def _clean_token(token: str | None, fallback: str) -> str:
    return token if token else fallback


def _a1111_dict(emb: Embedding, *, checkpoint_hash: str | None, checkpoint_name: str | None) -> dict[str, Any]:
    name = _clean_token(emb.token, emb.name)
    if emb.is_sdxl():
        d: dict[str, Any] = {k: v.contiguous() for k, v in emb.vectors.items()}
    else:
        d = {"string_to_token": {"*": A1111_TOKEN_ID}, "string_to_param": {"*": emb.single().contiguous()}}
    d.update({"name": name, "step": emb.step or 0, "sd_checkpoint": checkpoint_hash,
              "sd_checkpoint_name": checkpoint_name})
    return d


def _card(emb: Embedding, image: Any = None) -> Any:
    """The picture of a PNG embedding: `image` when given, else a plain card with the name."""
    from PIL import Image, ImageDraw

    if image is not None:
        return image.convert("RGB")
    card = Image.new("RGB", (256, 96), (40, 40, 48))
    draw = ImageDraw.Draw(card)
    draw.text((10, 12), emb.name, fill=(240, 240, 240))
    draw.text((10, 40), f"{emb.num_vectors} vector(s), {emb.shapes()}", fill=(180, 180, 190))
    draw.text((10, 64), f"step {emb.step or 0}; textual inversion (sdtune)", fill=(180, 180, 190))
    return card


def write_embedding(emb: Embedding, path: str | Path, format: str = "safetensors", *,
                    metadata: Mapping[str, str] | None = None, checkpoint_hash: str | None = None,
                    checkpoint_name: str | None = None, image: Any = None) -> Path:
    """Write `emb` in `format` (one of FORMATS) atomically; returns the path.

    safetensors: `emb_params` (one encoder) or `clip_l`/`clip_g` (SDXL), with `metadata`. diffusers: `{token:
    [n, d]}` (.safetensors, or a .bin pickle); SDXL as clip_l/clip_g. a1111: a .pt with string_to_param (SDXL:
    clip_l/clip_g, name, step). kohya: `emb_params` (SDXL: clip_l/clip_g). sdxl: clip_l/clip_g. png: the A1111
    dict in the image's `sd-ti-embedding` chunk and, as A1111 writes it, in the pixels (so the file still loads in
    A1111 and sdtune when the chunk is stripped)."""
    from sdtune.formats.safe_io import save_safetensors_atomic, save_torch_pickle_atomic

    if format not in FORMATS:
        raise SdtuneError(f"unknown embedding format {format!r}; use one of {', '.join(FORMATS)}")
    out = Path(path).expanduser()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("sdtune_ti_token", _clean_token(emb.token, emb.name))
    meta.setdefault("sdtune_ti_vectors", str(emb.num_vectors))
    if emb.step is not None:
        meta.setdefault("sdtune_step", str(emb.step))
    vecs = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in emb.vectors.items()}
    sdxl = emb.is_sdxl()
    if format == "sdxl" and not sdxl:
        raise SdtuneError(f"embedding {emb.name!r} ({emb.shapes()}) is not an SDXL embedding (clip_l + clip_g)")
    if sdxl and format in SDXL_REFUSED:
        raise SdtuneError(SDXL_REFUSED[format])
    if format in ("safetensors", "kohya", "sdxl") or (format == "diffusers" and out.suffix.lower() != ".bin"):
        if sdxl:
            tensors = vecs
        elif format == "diffusers":
            tensors = {_clean_token(emb.token, emb.name): emb.single().float().contiguous()}
        else:
            tensors = {"emb_params": emb.single().float().contiguous()}
        if format == "diffusers" and out.suffix.lower() != ".safetensors":
            raise SdtuneError(f"{out.name}: the diffusers layout is written as .safetensors or .bin")
        return save_safetensors_atomic(tensors, out, meta)
    if format == "diffusers":  # .bin
        obj: dict[str, Any] = vecs if sdxl else {_clean_token(emb.token, emb.name): emb.single().float()}
        return save_torch_pickle_atomic(obj, out)
    if format == "a1111":
        d = _a1111_dict(Embedding(emb.name, vecs, emb.token, emb.step), checkpoint_hash=checkpoint_hash,
                        checkpoint_name=checkpoint_name)
        d["sdtune_metadata"] = json.dumps(meta)
        return save_torch_pickle_atomic(d, out)
    # png
    d = _a1111_dict(Embedding(emb.name, vecs, emb.token, emb.step), checkpoint_hash=checkpoint_hash,
                    checkpoint_name=checkpoint_name)
    d["name"] = out.stem if out.suffix.lower() == ".png" else d["name"]
    from PIL.PngImagePlugin import PngInfo

    import numpy as np
    from PIL import Image

    from sdtune.adapters.textual_inversion.image_data import insert_payload

    info = PngInfo()
    info.add_text(PNG_CHUNK, png_payload(d))
    info.add_text("sdtune_metadata", json.dumps(meta))
    picture = Image.fromarray(insert_payload(np.asarray(_card(emb, image)),
                                             json.dumps(d, default=_tensor_json).encode("utf-8")), mode="RGB")
    return _atomic(out, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info))


def _atomic(out: Path, write: Any) -> Path:
    from sdtune.atomic import atomic_path

    with atomic_path(out) as tmp:
        write(str(tmp))
    return out


def file_stem_for(token: str) -> str:
    """A file name for a token, usable as the embedding's name in A1111 and ComfyUI ("<star>" -> "star"): dropped are
    what file systems reject, whitespace (ComfyUI's `embedding:NAME` ends there) and prompt syntax, which both tools
    would read as emphasis or a separator instead of the name: ( ) [ ] , (ComfyUI also ends the name at '<', '[')."""
    stem = re.sub(r"[\\/:*?\"<>|\s()\[\],]+", "", token).strip(".")
    return stem or "embedding"
