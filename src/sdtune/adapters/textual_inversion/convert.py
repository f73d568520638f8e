"""`sdtune convert EMBEDDING --to FORMAT`: rewrite an embedding in another layout and prove the result reads back
to the same vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdtune.errors import SdtuneError
from sdtune.adapters.textual_inversion.files import FORMAT_EXT, read_embedding, write_embedding


def convert_embedding(src: str | Path, target: str, out: str | Path, *, model: str | None = None,
                      dtype: str | None = None, **_: Any) -> str:
    emb = read_embedding(src)
    out = Path(out)
    if not out.suffix:
        out = out.with_suffix(FORMAT_EXT[target])
    if target == "png" and out.suffix.lower() != ".png":
        raise SdtuneError(f"{out.name}: a png embedding is written to a .png file")
    if target == "a1111" and out.suffix.lower() not in (".pt", ".bin"):
        raise SdtuneError(f"{out.name}: the A1111 layout is a .pt file")
    if target in ("safetensors", "kohya", "sdxl") and out.suffix.lower() != ".safetensors":
        raise SdtuneError(f"{out.name}: the {target} layout is a .safetensors file")
    note = ""
    if model is not None:
        from sdtune.models import load_model
        from sdtune.adapters.textual_inversion.library import _slots_of, fit_check

        loaded = load_model(model, device="cpu")
        why = fit_check(emb, _slots_of(loaded.pipe))
        if why is not None:
            raise SdtuneError(f"{Path(src).name} does not fit {loaded.name}: {why}")
        note = f"; fits {loaded.name} ({loaded.family})"
    if dtype not in (None, "fp32"):
        note += "; embeddings are always written in fp32 (they are tiny)"
    if emb.token is None:
        emb.token = emb.name
    path = write_embedding(emb, out, target, metadata=emb.metadata)
    back = read_embedding(path)
    a = sorted(emb.vectors.items())
    b = sorted(back.vectors.items())
    if [v.shape for _, v in a] != [v.shape for _, v in b] or not all(torch.equal(x, y) for (_, x), (_, y) in
                                                                      zip(a, b)):
        raise SdtuneError(f"sdtune bug: {path.name} does not read back to the vectors of {Path(src).name}")
    return (f"{Path(src).name} ({emb.layout}, {emb.shapes()}, token {emb.token!r}) -> {path} ({target}); read back "
            f"identical; use it in prompts as {back.name!r}{note}")
