"""CLI: `sdtune info FILE` - what a model file is, without loading it into a model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sdtune.models.bundled import is_bundled_model
from sdtune.paths import check_name, check_readable

_LONG = 160  # metadata values longer than this are shortened unless --full


def _human_size(path: Path) -> str:
    size: float
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        size = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover


@click.command("info")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
@click.option("--keys", is_flag=True, help="List every tensor name with its shape.")
@click.option("--full", is_flag=True, help="Do not shorten long metadata values.")
@click.option("--hash", "with_hash", is_flag=True, help="Also compute the A1111 model hash (reads the whole file).")
def info(file: Path, as_json: bool, keys: bool, full: bool, with_hash: bool) -> None:
    """Show what FILE is: a checkpoint, VAE, textual-inversion embedding, LoRA/LyCORIS, hypernetwork or diffusers
    folder; which model family it is for (sd1, sd2, sdxl, sdxl-refiner); tensor counts and shapes; and its
    metadata (e.g. kohya's ss_* training settings).

    Only headers are read for .safetensors files. .ckpt/.pt files are opened with torch's weights-only loader,
    which refuses pickles that contain code.

    \b
    Examples:
      sdtune info model.safetensors
      sdtune info lora.safetensors --full
      sdtune info embedding.pt --keys
      sdtune info ./my-diffusers-model --json
      sdtune info tiny --hash           # the bundled toy model
    """
    from sdtune.formats.identify import identify

    check_name(file, str(file))
    if not file.exists() and is_bundled_model(file):  # the bundled model, by the name --model takes
        from sdtune.models.bundled import bundled_model_path

        file = bundled_model_path()
    check_readable(file, str(file))
    fi = identify(file)
    model_hash = None
    if with_hash:
        from sdtune.models.hashing import file_hash, folder_hash

        model_hash = folder_hash(fi.path) if fi.path.is_dir() else file_hash(fi.path)
    if as_json:
        data = fi.to_dict()
        if model_hash:
            data["hash"] = model_hash
        if keys and not fi.path.is_dir():
            data["keys"] = {k: list(v) for k, v in _shapes(fi.path).items()}
        click.echo(json.dumps(data, indent=2, default=str))
        return
    rows = [("file", str(fi.path)), ("kind", fi.kind), ("family", fi.family or "unknown"),
            ("format", f"{fi.format} ({_human_size(fi.path)})"),
            ("tensors", f"{fi.tensor_count} ({_params(fi.parameters)} parameters"
                        + (f"; {', '.join(f'{d} x{n}' for d, n in sorted(fi.dtypes.items()))})" if fi.dtypes else ")"))]
    if model_hash:
        rows.append(("hash", model_hash))
    for name, value in rows:
        click.echo(f"{name + ':':<9} {value}")
    if fi.summary:
        click.echo("contents:")
        for line in fi.summary:
            click.echo(f"  {line}")
    if fi.metadata:
        click.echo("metadata:")
        for k in sorted(fi.metadata):
            v = fi.metadata[k].replace("\n", " ")
            if not full and len(v) > _LONG:
                v = v[:_LONG] + f"... ({len(v)} chars; --full shows all)"
            click.echo(f"  {k}: {v}")
    if keys and not fi.path.is_dir():
        click.echo("keys:")
        for k, s in _shapes(fi.path).items():
            click.echo(f"  {k}: {list(s)}")


def _params(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from sdtune.formats.identify import flatten_tensors
    from sdtune.formats.safe_io import SAFETENSORS_EXTS, load_pickle, read_safetensors_header, unwrap_state_dict

    if path.suffix.lower() in SAFETENSORS_EXTS:
        return {k: i.shape for k, i in read_safetensors_header(path)[0].items()}
    return {k: tuple(v.shape) for k, v in flatten_tensors(unwrap_state_dict(load_pickle(path))).items()}


def register(cli: click.Group) -> None:
    cli.add_command(info)
