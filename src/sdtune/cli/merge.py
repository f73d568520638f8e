"""CLI: `sdtune merge` - bake LoRAs into a model and save it as a diffusers folder or a single-file checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from sdtune.atomic import DIR_MODE
from sdtune.errors import SdtuneError
from sdtune.models.bundled import is_bundled_model
from sdtune.paths import check_readable, check_writable_dir, check_writable_file

DTYPES = ("auto", "fp32", "fp16", "bf16")


def run_merge(model: str | None, loras: list[Any], out: Path, *, dtype: str | None = None,
              save_dtype: str | None = None) -> Path:
    """Load `model`, add every LoRA times its weight to the weights, save to `out` (.safetensors = single file,
    anything else = a new diffusers folder). Returns the output path."""
    import torch

    from sdtune.adapters.lora.merge import merge_loras
    from sdtune.adapters.lora.tags import parse_lora_arg
    from sdtune.models import load_model

    specs = [parse_lora_arg(x) if isinstance(x, str) else tuple(x) for x in loras]
    if not specs:
        raise SdtuneError("no LoRA given; pass --lora FILE[:WEIGHT] (repeatable)")
    for path, _ in specs:
        if not Path(path).expanduser().is_file():
            what = "is a folder; give a LoRA file" if Path(path).expanduser().is_dir() else "no such file"
            raise SdtuneError(f"--lora {path}: {what}")
        check_readable(path, f"--lora {path}")
    if model and not is_bundled_model(model) and Path(model).expanduser().exists():
        check_readable(model, f"--model {model}")
    single = out.suffix.lower() == ".safetensors"
    if out.exists() and (single or not out.is_dir() or any(out.iterdir())):
        raise SdtuneError(f"{out} already exists; choose a new output path (merge never overwrites)")
    if out.suffix and not single:
        raise SdtuneError(f"{out.name}: write a single-file checkpoint as .safetensors, or give a folder name")
    if single:
        check_writable_file(out, f"--out {out}")
    else:
        check_writable_dir(out, "--out")
    loaded = load_model(model, device="cpu", dtype=None if dtype in (None, "auto") else dtype)
    merged = merge_loras(loaded, specs, model_name=loaded.name)
    record = json.dumps([{"name": m.name, "weight": m.weight, "hash": m.hash, "modules": m.modules}
                         for m in merged])
    target_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(save_dtype or "")
    if single:
        from sdtune.formats.checkpoint import save_single_file

        return save_single_file(loaded.pipe, out, loaded.family, dtype=target_dtype,
                                metadata={"sdtune_merged_loras": record, "sdtune_base_model": loaded.name,
                                          "sdtune_base_model_hash": loaded.hash})
    import shutil
    import tempfile

    from sdtune.models.loading import quiet_loading
    from sdtune.paths import writing

    pipe = loaded.pipe.to(target_dtype) if target_dtype is not None else loaded.pipe
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out):  # the folder appears complete or not at all: a full disk leaves no half model behind
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            with quiet_loading():
                pipe.save_pretrained(str(tmp), safe_serialization=True)
            (tmp / "sdtune_merge.json").write_text(json.dumps({"base_model": loaded.name, "base_model_hash":
                                                              loaded.hash, "loras": json.loads(record)}, indent=2)
                                                   + "\n")
            os.chmod(tmp, DIR_MODE)
            os.replace(tmp, out)  # onto a missing or empty folder (checked above)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def register(cli: click.Group) -> None:
    @cli.command("merge")
    @click.option("--model", "-m", metavar="MODEL", help="Diffusers folder, .safetensors/.ckpt file, or `tiny` "
                  "(default: tiny).")
    @click.option("--lora", "loras", multiple=True, metavar="FILE[:W]", required=True,
                  help="LoRA file and weight [default: 1]; repeat for several.")
    @click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
                  help="OUT.safetensors = single-file checkpoint (A1111/ComfyUI); otherwise a new diffusers folder.")
    @click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                  help="dtype to load and merge in (CPU; auto = fp32).")
    @click.option("--save-dtype", type=click.Choice(("fp32", "fp16", "bf16")), help="Cast the saved weights "
                  "(fp16 halves the file)  [default: as loaded]")
    def merge(model: str | None, loras: tuple[str, ...], out: Path, dtype: str, save_dtype: str | None) -> None:
        """Bake LoRAs into a model: W + weight x LoRA delta for every LoRA, saved as a normal model.

        \b
        Examples:
          sdtune merge --model sd15.safetensors --lora style.safetensors:0.8 --lora face.safetensors:0.5 \\
              --out sd15-style.safetensors
          sdtune merge --lora heart.safetensors --out tiny-heart/
        """
        path = run_merge(model, list(loras), out, dtype=dtype, save_dtype=save_dtype)
        click.echo(f"merged {len(loras)} LoRA(s): {path}")
