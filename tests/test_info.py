"""`sdtune info`: output for each kind of file, --json/--keys, --help, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtune.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        main(["info", *map(str, args)])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _lora(tmp: Path) -> Path:
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    p = tmp / "style_lora.safetensors"
    save_file({f"{k}.lora_down.weight": torch.zeros(8, 768), f"{k}.lora_up.weight": torch.zeros(320, 8),
               f"{k}.alpha": torch.tensor(8.0)},
              str(p), metadata={"ss_network_dim": "8", "ss_network_alpha": "8", "ss_output_name": "style",
                                "ss_tag_frequency": json.dumps({"set": {f"tag{i}": i for i in range(100)}})})
    return p


def _embedding(tmp: Path) -> Path:
    p = tmp / "cat.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768)}, "name": "cat",
                "step": 500}, p)
    return p


def test_info_lora(tmp_path, capsys):
    code, out, err = run(capsys, _lora(tmp_path))
    assert code == 0 and err == ""
    assert "kind:     lora" in out and "family:   sd1" in out
    assert "rank: 8 (x1)" in out and "ss_network_dim: 8" in out
    assert "--full shows all" in out  # the long ss_tag_frequency value is shortened


def test_info_embedding_json_and_keys(tmp_path, capsys):
    code, out, _ = run(capsys, _embedding(tmp_path), "--json", "--keys")
    data = json.loads(out)
    assert code == 0 and (data["kind"], data["family"]) == ("embedding", "sd1")
    assert data["keys"] == {"string_to_param.*": [2, 768]} and data["metadata"]["name"] == "cat"


def test_info_checkpoint_with_hash(tmp_path, capsys, monkeypatch):
    from sdtune.formats.checkpoint import save_single_file
    from sdtune.models.testing import tiny_pipeline

    path = save_single_file(tiny_pipeline("sd1"), tmp_path / "model.safetensors", "sd1")
    monkeypatch.setenv("SDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    code, out, _ = run(capsys, path, "--hash")
    assert code == 0 and "kind:     checkpoint" in out and "family:   sd1" in out
    assert "components: UNet, VAE, text encoder" in out and "modelspec.architecture: stable-diffusion-v1" in out
    import hashlib

    assert f"hash:     {hashlib.sha256(path.read_bytes()).hexdigest()[:10]}" in out


def test_info_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "Usage: sdtune info [OPTIONS] FILE" in out
    for word in ("checkpoint", "LoRA", "hypernetwork", "--json", "--keys", "weights-only"):
        assert word in out


@pytest.mark.parametrize("kind", ["missing", "dir", "text", "truncated", "ext", "evil"])
def test_info_bad_input_one_line_exit_2(tmp_path, capsys, kind):
    target = {"missing": tmp_path / "nope.safetensors", "dir": tmp_path / "d", "text": tmp_path / "t.safetensors",
              "truncated": tmp_path / "c.safetensors", "ext": tmp_path / "x.gguf", "evil": tmp_path / "e.ckpt"}[kind]
    if kind == "dir":
        target.mkdir()
    elif kind == "text":
        target.write_text("just text\n" * 100)
    elif kind == "truncated":
        save_file({"a": torch.randn(100, 100)}, str(target))
        target.write_bytes(target.read_bytes()[:2000])
    elif kind == "ext":
        target.write_bytes(b"GGUF" + b"\0" * 100)
    elif kind == "evil":
        class Boom:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'PWNED'}",))
        torch.save({"x": Boom()}, target)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, target)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "PWNED").exists()


def test_info_names_the_bundled_model_tiny(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called "tiny" here: the name means the bundled model, as --model tiny does
    code, out, err = run(capsys, "tiny", "--hash")
    assert code == 0 and err == ""
    assert "family:   sd1" in out and "hash:" in out


def test_info_reads_png_embeddings_and_refuses_plain_images(tmp_path):
    """A1111's image embeddings (the dict in the PNG's text chunk); before, `info` refused every .png."""
    import torch
    from PIL import Image

    from sdtune.adapters.textual_inversion.files import Embedding, write_embedding
    from sdtune.errors import SdtuneError
    from sdtune.formats.identify import identify

    path = write_embedding(Embedding(name="pngemb", vectors={"*": torch.randn(2, 768)}), tmp_path / "pngemb.png", "png")
    fi = identify(path)
    assert (fi.kind, fi.family, fi.format, fi.parameters) == ("embedding", "sd1", "png", 2 * 768)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(SdtuneError, match="without an embedding"):
        identify(tmp_path / "plain.png")
