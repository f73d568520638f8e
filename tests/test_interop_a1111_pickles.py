"""Every `.pt` / `.bin` sdtune writes passes AUTOMATIC1111's default safe unpickler (`modules/safe.py`, v1.x), encoded
here as facts, not copied code:

- a zip file is opened only if every entry name matches `<root>/data.pkl`, `<root>/version`, `<root>/data/<n>`
  (v1.10 also allows `<root>/byteorder`; the strictest set is checked here), and its one data.pkl then passes the
  restricted unpickler;
- a non-zip file (torch's legacy format) is read as five pickles through the restricted unpickler;
- the restricted unpickler resolves only these globals: collections.OrderedDict; torch._utils._rebuild_tensor_v2,
  _rebuild_parameter, _rebuild_device_tensor_from_numpy; torch.FloatStorage, HalfStorage, IntStorage, LongStorage,
  DoubleStorage, ByteStorage, float32; torch.nn.modules.container.ParameterDict; numpy.core.multiarray.scalar,
  _reconstruct; numpy.dtype, ndarray; _codecs.encode; __builtin__.set. Anything else ("bad file inside ...",
  "global ... is forbidden") and A1111 refuses the file.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile

import pytest
import torch

ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "float32")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("__builtin__", "set"),
}


class A1111Refused(Exception):
    pass


class _Restricted(pickle.Unpickler):
    def persistent_load(self, saved_id):
        if saved_id[0] != "storage":
            raise A1111Refused(f"persistent id {saved_id[0]!r}")
        return torch.UntypedStorage()

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise A1111Refused(f"global '{module}/{name}' is forbidden")
        import importlib

        return getattr(importlib.import_module(module), name)


def a1111_accepts(path) -> None:
    """Raise A1111Refused where A1111's safe unpickler would refuse the file (the globals are not called: only
    which ones a file names matters)."""

    class Probe(_Restricted):
        def find_class(self, module, name):
            if (module, name) not in ALLOWED_GLOBALS:
                raise A1111Refused(f"global '{module}/{name}' is forbidden")
            return lambda *a, **k: None

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            bad = [n for n in z.namelist() if not ZIP_NAMES.match(n)]
            if bad:
                raise A1111Refused(f"bad file inside {path}: {bad[0]}")
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise A1111Refused("data.pkl not found")
            Probe(io.BytesIO(z.read(pkl[0]))).load()
        return
    with open(path, "rb") as f:
        probe = Probe(f)
        for _ in range(5):
            probe.load()


def test_the_rule_refuses_what_a1111_refuses(tmp_path):
    """The check itself: torch 2.x's default zip has entries A1111 refuses; a pickle naming code is refused."""
    torch.save({"x": torch.ones(2)}, tmp_path / "default.pt")
    with pytest.raises(A1111Refused, match="bad file inside"):
        a1111_accepts(tmp_path / "default.pt")
    torch.save({"x": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf16.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(A1111Refused, match="BFloat16Storage"):
        a1111_accepts(tmp_path / "bf16.pt")
    (tmp_path / "code.pt").write_bytes(pickle.dumps(print, protocol=2))
    with pytest.raises((A1111Refused, EOFError)):
        a1111_accepts(tmp_path / "code.pt")


def _embedding(width=768, n=2):
    from sdtune.adapters.textual_inversion.files import Embedding

    return Embedding(name="shiny", vectors={"*": torch.randn(n, width)}, token="<shiny>", step=10)


@pytest.mark.parametrize("fmt,name", [("a1111", "shiny.pt"), ("diffusers", "learned_embeds.bin")])
def test_embedding_pickles_load_in_a1111(tmp_path, fmt, name):
    from sdtune.adapters.textual_inversion.files import read_embedding, write_embedding

    emb = _embedding()
    path = write_embedding(emb, tmp_path / name, fmt)
    a1111_accepts(path)
    assert torch.equal(read_embedding(path).single(), emb.single())
    assert torch.load(path, weights_only=True)  # ComfyUI and kohya read it with torch.load


def test_hypernetwork_pt_loads_in_a1111(tmp_path):
    from sdtune.adapters.hypernetwork.io import read_hypernetwork, save_hypernetwork
    from sdtune.adapters.hypernetwork.network import Hypernetwork

    hn = Hypernetwork([320, 640, 768, 1280], name="sketch")
    path = save_hypernetwork(hn, tmp_path / "sketch.pt", format="a1111")
    a1111_accepts(path)
    back = read_hypernetwork(path)
    assert sorted(back.widths) == [320, 640, 768, 1280]


def test_bf16_tensors_are_written_in_a_whitelisted_dtype(tmp_path):
    from sdtune.formats.safe_io import save_torch_pickle_atomic

    path = save_torch_pickle_atomic({"a": torch.ones(3, dtype=torch.bfloat16), "b": [torch.zeros(1)]}, tmp_path / "x.pt")
    a1111_accepts(path)
    assert torch.load(path, weights_only=True)["a"].dtype == torch.float32


@pytest.mark.parametrize("fmt", ["a1111", "png"])
def test_sdxl_embeddings_are_refused_in_the_formats_a1111_cannot_read(tmp_path, fmt):
    from sdtune.adapters.textual_inversion.files import Embedding, write_embedding
    from sdtune.errors import SdtuneError

    emb = Embedding(name="x", vectors={"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)})
    with pytest.raises(SdtuneError, match="clip_l \\+ clip_g in a .safetensors"):
        write_embedding(emb, tmp_path / f"x.{'pt' if fmt == 'a1111' else 'png'}", fmt)
    assert not list(tmp_path.iterdir())  # nothing written
    path = write_embedding(emb, tmp_path / "x.safetensors", "safetensors")  # the layout A1111 and ComfyUI read
    from safetensors.torch import load_file

    assert {k: tuple(v.shape) for k, v in load_file(path).items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}


def test_hypernetworks_default_to_the_a1111_pt_and_warn_where_comfyui_differs():
    from sdtune.training.methods.hypernetwork import HypernetworkMethod, HypernetworkOptions, comfyui_warnings

    assert HypernetworkOptions().format == "a1111" and HypernetworkMethod().file_ext == ".pt"
    assert comfyui_warnings(HypernetworkOptions(activation="relu")) == []
    assert "gelu" in comfyui_warnings(HypernetworkOptions(activation="gelu"))[0]
    assert "layer_norm" in comfyui_warnings(HypernetworkOptions(activation="swish", layer_norm=True))[0]
