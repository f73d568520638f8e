"""`sdtune merge`, `sdtune convert` and `sdtune generate --lora` on a tiny random SD1 model."""

from __future__ import annotations

import json

import pytest
import torch

from sdtune.cli.testing import run_cli
from sdtune.models.testing import save_tiny_pipeline

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning", "ignore::RuntimeWarning"),
              pytest.mark.usefixtures("hash_cache")]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import KOHYA_UNET, TEXT, random_network

    d = tmp_path_factory.mktemp("lora_cli")
    pipe = save_tiny_pipeline(d / "model")
    net = random_network(pipe, unet=KOHYA_UNET + ("conv1",), text=TEXT, seed=1)
    lora = save_lora(net, d / "style.safetensors")
    return {"dir": d, "model": d / "model", "lora": lora, "deltas": net.deltas()}


def _weights(pipe) -> dict[str, torch.Tensor]:
    from sdtune.adapters.lora.models import target_modules

    return {n: m.weight.detach().clone() for n, m in target_modules(pipe).items()}


@pytest.mark.parametrize("out_name", ["merged.safetensors", "merged_folder"])
def test_merge_writes_base_plus_weighted_delta(setup, capsys, tmp_path, out_name):
    from sdtune.models import load_model

    out = tmp_path / out_name
    code, stdout, err = run_cli(["merge", "--model", str(setup["model"]), "--lora", f"{setup['lora']}:0.7",
                                 "--out", str(out)], capsys)
    assert code == 0, err
    assert f"merged 1 LoRA(s): {out}" in stdout
    base = _weights(load_model(str(setup["model"]), device="cpu").pipe)
    merged = _weights(load_model(str(out), device="cpu").pipe)
    for name, w in base.items():
        want = w + 0.7 * setup["deltas"][name].reshape(w.shape) if name in setup["deltas"] else w
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6)
    if out.is_dir():
        record = json.loads((out / "sdtune_merge.json").read_text())
        assert record["loras"][0]["name"] == "style" and record["loras"][0]["weight"] == 0.7


@pytest.mark.parametrize("out_name", ["merged.safetensors", "merged_folder"])
def test_merge_on_a_full_disk_leaves_nothing(setup, capsys, tmp_path, monkeypatch, out_name):
    """A full disk while saving the merged model: one line, and no partial file or folder (issue 19)."""
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        real(dict(list(tensors.items())[:1]), filename, *args, **kwargs)  # a part is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / out_name
    code, _, err = run_cli(["merge", "--model", str(setup["model"]), "--lora", str(setup["lora"]), "--out",
                            str(out)], capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: no space left writing {out}: free space or "
                                                      "choose another --out"], err
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_existing_output_and_other_families(setup, capsys, tmp_path):
    from sdtune.adapters.lora import save_lora
    from sdtune.adapters.lora.testing import random_network
    from sdtune.models.testing import tiny_pipeline

    (tmp_path / "taken.safetensors").write_bytes(b"x")
    code, _, err = run_cli(["merge", "--model", str(setup["model"]), "--lora", str(setup["lora"]), "--out",
                            str(tmp_path / "taken.safetensors")], capsys)
    assert code == 2 and "already exists" in err
    xl = save_lora(random_network(tiny_pipeline("sdxl")), tmp_path / "xl.safetensors")
    code, _, err = run_cli(["merge", "--model", str(setup["model"]), "--lora", str(xl), "--out",
                            str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and "xl.safetensors is a SDXL LoRA but model is SD1" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_convert_round_trip_and_dispatch_by_kind(setup, capsys, tmp_path):
    from sdtune.adapters.lora import read_lora

    d_out, k_out = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    code, stdout, err = run_cli(["convert", str(setup["lora"]), "--to", "diffusers", "--out", str(d_out),
                                 "--model", str(setup["model"])], capsys)
    assert code == 0, err
    assert "reload through diffusers with the trained deltas" in stdout
    code, stdout, err = run_cli(["convert", str(d_out), "--to", "kohya", "--out", str(k_out)], capsys)
    assert code == 0, err
    for name, d in read_lora(k_out).deltas().items():
        torch.testing.assert_close(d, setup["deltas"][name], rtol=1e-6, atol=1e-7)
    code, _, err = run_cli(["convert", str(setup["model"] / "unet" / "diffusion_pytorch_model.safetensors"),
                            "--to", "kohya", "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "is a unet file; sdtune converts only these kinds so far: " in err and "lora" in err
    code, _, err = run_cli(["convert", str(setup["lora"]), "--to", "kohya", "--out", str(k_out)], capsys)
    assert code == 2 and "already exists" in err


def test_generate_with_lora_option(setup, capsys, tmp_path):
    from sdtune.adapters.lora.tags import lora_short_hash
    from sdtune.generate import read_png_infotext

    common = ["generate", "a red circle", "--model", str(setup["model"]), "--steps", "2", "--seed", "1"]
    code, _, err = run_cli(common + ["--lora", f"{setup['lora']}:0.6", "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    png = next((tmp_path / "a").glob("*.png"))
    assert f'Lora hashes: "style: {lora_short_hash(setup["lora"])}"' in read_png_infotext(png)
    # --from-png of it: the LoRA was not in the prompt, so the infotext cannot bring it back; say so
    code, _, err = run_cli(["generate", "--from-png", str(png), "--model", str(setup["model"]), "--out",
                            str(tmp_path / "again")], capsys)
    assert code == 0 and "made with LoRA style applied outside its prompt" in err and "--lora" in err, err
    code, _, err = run_cli(["generate", "--from-png", str(png), "--model", str(setup["model"]), "--lora",
                            f"{setup['lora']}:0.6", "--out", str(tmp_path / "again2")], capsys)
    assert code == 0 and "outside its prompt" not in err
    assert (tmp_path / "again2" / png.name).read_bytes() == png.read_bytes()  # with the same --lora: bit for bit
    code, _, err = run_cli(common + ["--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "b")],
                           capsys)
    assert code == 2 and "missing.safetensors: no such file" in err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
