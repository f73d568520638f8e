"""CLI: `sdtune ui` - the web UI and the A1111-compatible HTTP API, one server on 127.0.0.1:7860 (A1111's port)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdtune.errors import SdtuneError

_DIR = click.Path(path_type=Path, file_okay=False)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SdtuneError("--auth takes USER:PASSWORD (both non-empty), e.g. --auth me:secret")
    return user, password


def build_settings(*, listen: bool, auth: str | None, no_api: bool, datasets: tuple[Path, ...],
                   device: str | None = None, **folders: Any) -> Any:
    """Server settings from the command's options; every folder is checked before anything starts."""
    from sdtune.server.app import Settings
    from sdtune.server.folders import ModelFolders

    model_folders = ModelFolders.from_options(**folders)
    for d in datasets:
        if not d.expanduser().is_dir():
            raise SdtuneError(f"--datasets {d}: no such folder")
    model_folders.datasets = [d.expanduser().resolve() for d in datasets] or [Path.cwd().resolve()]
    from sdtune.paths import check_readable, check_writable_dir

    for folder, option in ((model_folders.outputs, "--outputs"), (model_folders.runs, "--runs")):
        if folder.exists() and not folder.is_dir():
            raise SdtuneError(f"{option} {folder} is a file; pass a folder")
        check_writable_dir(folder, option)
    for option, given in (("--data-dir", folders.get("data_dir")), ("--ckpt-dir", folders.get("ckpt_dir")),
                          ("--vae-dir", folders.get("vae_dir")), ("--lora-dir", folders.get("lora_dir")),
                          ("--embeddings-dir", folders.get("embeddings_dir")),
                          ("--hypernetwork-dir", folders.get("hypernetwork_dir")), *(("--datasets", d) for d in datasets)):
        if given is not None and Path(given).expanduser().is_dir():
            check_readable(given, f"{option} {given}")
    from sdtune.cli.recipe import wrong_lora_model_defaults
    from sdtune.toy.concept_eval import evaluator_for

    return Settings(folders=model_folders, auth=parse_auth(auth), listen=listen, api=not no_api, device=device,
                    evaluator_for=evaluator_for, recipe_defaults=wrong_lora_model_defaults)


@click.command("ui")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535), help="Port to serve on.")
@click.option("--listen", is_flag=True, help="Serve on all network interfaces (0.0.0.0) instead of 127.0.0.1 only; "
              "set --auth too.")
@click.option("--auth", metavar="USER:PASSWORD", help="HTTP basic auth for the UI and the API (A1111's --api-auth).")
@click.option("--no-api", is_flag=True, help="Do not offer A1111's /sdapi/v1 API to other programs (the UI still "
              "uses it).")
@click.option("--data-dir", type=_DIR, help="An A1111 install: its models/Stable-diffusion, models/VAE, models/Lora, "
              "models/hypernetworks and embeddings folders are used (and outputs/ for images).")
@click.option("--ckpt-dir", type=_DIR, help="Checkpoint folder (A1111: models/Stable-diffusion).")
@click.option("--vae-dir", type=_DIR, help="VAE folder (A1111: models/VAE).")
@click.option("--lora-dir", type=_DIR, help="LoRA folder (A1111: models/Lora).")
@click.option("--embeddings-dir", type=_DIR, help="Textual Inversion embeddings folder (A1111: embeddings).")
@click.option("--hypernetwork-dir", type=_DIR, help="Hypernetwork folder (A1111: models/hypernetworks).")
@click.option("--outputs", type=_DIR, help="Where generated images are saved. [default: outputs]")
@click.option("--runs", type=_DIR, help="Where training runs are written. [default: runs]")
@click.option("--datasets", type=_DIR, multiple=True, help="Folders the Train page may read datasets from "
              "(repeatable). [default: the current folder]")
@click.option("--device", default=None, help="cuda, cuda:1, mps or cpu (default: automatic).")
def ui_cmd(port: int, listen: bool, auth: str | None, no_api: bool, data_dir: Path | None, ckpt_dir: Path | None,
           vae_dir: Path | None, lora_dir: Path | None, embeddings_dir: Path | None, hypernetwork_dir: Path | None,
           outputs: Path | None, runs: Path | None, datasets: tuple[Path, ...], device: str | None) -> None:
    """Start the web UI and the A1111-compatible API (one server). Opens nothing by itself: visit the printed URL.

    \b
    Examples:
      sdtune ui                                   # the bundled tiny model, at http://127.0.0.1:7860
      sdtune ui --data-dir ~/stable-diffusion-webui
      sdtune ui --ckpt-dir ~/models --lora-dir ~/loras --port 7861
      sdtune ui --listen --auth me:secret          # reachable from the network, password protected
    """
    import uvicorn

    from sdtune.server.app import create_app

    settings = build_settings(listen=listen, auth=auth, no_api=no_api, datasets=datasets, device=device,
                              data_dir=data_dir, ckpt_dir=ckpt_dir, vae_dir=vae_dir, lora_dir=lora_dir,
                              embeddings_dir=embeddings_dir, hypernetwork_dir=hypernetwork_dir, outputs=outputs,
                              runs=runs)
    host = "0.0.0.0" if listen else "127.0.0.1"
    if listen and settings.auth is None:
        click.echo("warning: --listen without --auth: anyone on the network can use this server and its files",
                   err=True)
    shown = "127.0.0.1" if not listen else "0.0.0.0 (all interfaces)"
    click.echo(f"sdtune UI: http://{'127.0.0.1' if not listen else 'localhost'}:{port}/  (serving on {shown}; "
               f"API docs at /docs)")
    preload_model_libraries()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


def preload_model_libraries() -> None:
    """Import diffusers' pipelines and transformers' text models once, before the server's threads start: their
    lazy first imports are not thread-safe (seen once: the token counter and the job worker importing together
    gave "cannot import name 'AutoModel' from 'transformers'" in the Extra networks panel)."""
    import diffusers.pipelines.pipeline_utils  # noqa: F401
    import transformers

    transformers.CLIPTextModel, transformers.CLIPTokenizer, transformers.AutoModel  # noqa: B018  (resolve lazily)


def register(cli: click.Group) -> None:
    cli.add_command(ui_cmd)
