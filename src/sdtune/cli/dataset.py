"""CLI: `sdtune dataset check DIR` - is this folder good training data, and what will go wrong."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group("dataset")
def dataset() -> None:
    """Training data: check a folder of images (+ .txt captions) before training on it."""


@dataset.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["ti", "lora", "dreambooth", "hypernetwork"]), default=None,
              help="The method you plan to train; tunes the advice (image counts, captions, style checks).")
@click.option("--resolution", default=512, show_default=True, type=click.IntRange(8, 8192),
              help="Training resolution (512 SD1, 768 SD2-v, 1024 SDXL, 64 the tiny model).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as one JSON object.")
def check_cmd(folder: Path, method: str | None, resolution: int, as_json: bool) -> None:
    """Report counts, sizes (min/median/max), aspect ratios, image modes, captions (missing, empty),
    unreadable files and near-duplicate groups, then the known pitfalls with advice: too few images for the
    method (TI 3-20, DreamBooth 10-20, LoRA 20+, hypernetwork 50+), images too alike, mixed styles for a style
    run, tiny images.

    Folders are plain (images with <name>.txt or <name>.caption captions) or kohya-style, with subfolders named
    <repeats>_<name>.

    Exit code 0 when the folder is usable (warnings allowed), 2 when it has no readable images.

    \b
    Examples:
      sdtune dataset check data/heart --method lora --resolution 64
      sdtune dataset check ~/train/sks_dog --method dreambooth --json
    """
    from tqdm import tqdm

    from sdtune.training.dataset_check import check_dataset

    bar = tqdm(desc="reading", unit="image", file=sys.stderr, disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = check_dataset(folder, method=method, resolution=resolution, progress=progress)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format())
    if not report.usable:
        click.echo(f"error: {folder} has no usable training images (see the report above); add images or fix "
                   "the ones listed", err=True)
        sys.exit(2)


def register(cli: click.Group) -> None:
    cli.add_command(dataset)
