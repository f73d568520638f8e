"""CLI: `sdtune convert FILE --to FORMAT --out PATH` - convert a file to another layout, by kind of file.

Kinds are detected with `sdtune.formats.identify`; each kind registers its target formats in `CONVERTERS`, so
Textual Inversion or hypernetwork conversions are added as new entries, not as new commands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import click

from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class Converter:
    targets: tuple[str, ...]
    run: Callable[..., str]  # (info, target, out, **options) -> message


CONVERTERS: dict[str, Converter] = {}


def register_converter(kind: str, targets: tuple[str, ...], run: Callable[..., str]) -> None:
    CONVERTERS[kind] = Converter(targets, run)


def _dtype(name: str | None) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(name or "")


def convert_lora(info: Any, target: str, out: Path, *, dtype: str | None = None, model: str | None = None,
                 **_: Any) -> str:
    """LoRA -> kohya or diffusers layout. The result is read back and compared with the source (every module's
    delta); with `model`, it is also reloaded through diffusers (`verify_lora_file`)."""
    from sdtune.adapters.lora import read_lora, save_lora, verify_lora_file
    from sdtune.adapters.lora.models import unet_layout_of

    loaded = None
    layout = None
    if model is not None:
        from sdtune.models import load_model

        loaded = load_model(model, device="cpu")
        layout = unet_layout_of(loaded)
    net = read_lora(info.path, layout=layout)
    if loaded is not None:
        from sdtune.adapters.lora.apply import check_compatible
        from sdtune.adapters.lora.models import target_modules

        check_compatible(net, loaded.family, target_modules(loaded), loaded.name)
        if net.family is None:
            net.family = loaded.family
    beside = _bundled_files(net, out) if target == "diffusers" else {}
    path = save_lora(net, out, format=target, dtype=_dtype(dtype), layout=layout)
    back = read_lora(path, layout=layout)
    want = net.deltas()
    got = back.deltas()
    if set(want) != set(got):
        raise SdtuneError(f"sdtune bug: {path.name} does not hold the same modules as {info.path.name}")
    tol = 1e-5 if dtype in (None, "fp32") else 3e-2
    for name, d in want.items():
        err = float((got[name] - d).abs().max()) / (float(d.abs().max()) or 1.0)
        if err > tol:
            raise SdtuneError(f"sdtune bug: {name} changed in the conversion (relative error {err:.1e})")
    msg = f"{info.path.name} ({net.describe()}) -> {path} ({target})"
    if beside:  # a PEFT file has no place for them (diffusers refuses bundle_emb keys)
        from sdtune.adapters.textual_inversion.files import Embedding, file_stem_for, write_embedding

        for name, file in beside.items():
            emb = write_embedding(Embedding(name=file_stem_for(name), vectors=dict(net.embeddings[name]), token=name),
                                  file, "safetensors")
            msg += f"\nbundled embedding {name}: not in the diffusers file; written beside it as {emb}"
    if loaded is not None:
        msg += f"\n{verify_lora_file(path, loaded, want, tolerance=None if dtype in (None, 'fp32') else 3e-2)}"
    return msg


def _bundled_files(net: Any, out: Path) -> dict[str, Path]:
    """Where each embedding bundled in a LoRA goes beside a diffusers-layout `out` (`<stem>.<word>.safetensors`,
    which A1111, ComfyUI and diffusers' `load_textual_inversion(file, token=...)` load); an existing file is refused
    before anything is written."""
    from sdtune.adapters.textual_inversion.files import file_stem_for

    files = {name: out.with_name(f"{out.stem}.{file_stem_for(name)}.safetensors") for name in net.embeddings}
    for name, file in files.items():
        if file.exists():
            raise SdtuneError(f"{file} exists (where the bundled embedding {name!r} would go); move it away or "
                              "choose another --out")
    return files


register_converter("lora", ("kohya", "diffusers"), convert_lora)


def _convert_hypernetwork(info: Any, target: str, out: Path, **options: Any) -> str:
    from sdtune.adapters.hypernetwork.io import convert_hypernetwork

    return convert_hypernetwork(info, target, out, **options)


register_converter("hypernetwork", ("a1111", "safetensors"), _convert_hypernetwork)


def _convert_embedding(info: Any, target: str, out: Path, **options: Any) -> str:
    from sdtune.adapters.textual_inversion.convert import convert_embedding

    return convert_embedding(info.path, target, out, **options)


register_converter("embedding", ("safetensors", "diffusers", "a1111", "kohya", "sdxl", "png"), _convert_embedding)


def run_convert(file: Path, target: str, out: Path, **options: Any) -> str:
    from sdtune.formats.identify import FileInfo, identify
    from sdtune.paths import check_readable, check_writable_file

    check_readable(file, str(file))
    if Path(out).exists():
        raise SdtuneError(f"{out} already exists; choose a new output path (convert never overwrites)")
    check_writable_file(out, f"--out {out}")
    model = options.get("model")
    if model and Path(model).expanduser().exists():
        check_readable(model, f"--model {model}")
    info: FileInfo | SimpleNamespace  # a converter reads its .path and .kind
    if Path(file).suffix.lower() in (".png", ".webp"):  # A1111 image embeddings (identify reads weight files only)
        info = SimpleNamespace(path=Path(file), kind="embedding")
    else:
        info = identify(file)
    conv = CONVERTERS.get(info.kind)
    if conv is None:
        known = ", ".join(sorted(CONVERTERS))
        raise SdtuneError(f"{Path(file).name} is a {info.kind} file; sdtune converts only these kinds so far: {known}")
    if target not in conv.targets:
        raise SdtuneError(f"a {info.kind} file converts to {', '.join(conv.targets)}, not {target!r}")
    if Path(out).exists():
        raise SdtuneError(f"{out} already exists; choose a new output path (convert never overwrites)")
    return conv.run(info, target, Path(out), **options)


def register(cli: click.Group) -> None:
    targets = sorted({t for c in CONVERTERS.values() for t in c.targets})

    @cli.command("convert")
    @click.argument("file", type=click.Path(path_type=Path))
    @click.option("--to", "target", required=True, type=click.Choice(targets), help="Target format.")
    @click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output file.")
    @click.option("--dtype", type=click.Choice(("fp32", "fp16", "bf16")), help="Cast the weights  "
                  "[default: as stored]")
    @click.option("--model", "-m", metavar="MODEL", help="Model the file is for: checks it fits, reloads the "
                  "result through diffusers to prove it loads, and gives the UNet layout for non-standard models.")
    def convert(file: Path, target: str, out: Path, dtype: str | None, model: str | None) -> None:
        """Convert FILE to another format. LoRA: `--to kohya` (A1111, ComfyUI, kohya, diffusers read it) or
        `--to diffusers` (PEFT layout, alpha kept in diffusers' `lora_adapter_metadata`).

        \b
        Examples:
          sdtune convert pytorch_lora_weights.safetensors --to kohya --out my_lora.safetensors
          sdtune convert my_lora.safetensors --to diffusers --out my_lora_diffusers.safetensors --model tiny
        """
        click.echo(run_convert(file, target, out, dtype=dtype, model=model))
