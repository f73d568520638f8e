"""CLI: `sdtune demo` - the main job end to end on the bundled tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("sdtune-demo"), show_default=True,
              help="Folder for the grids and the report.")
@click.option("--model", default=None, help="Model to run the demo on (default: the bundled tiny model).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 200), help="Sampling steps.")
def demo(out: Path, model: str | None, steps: int) -> None:
    """Run sdtune's main job on the bundled `tiny` model: generate, judge, report (a few minutes on a CPU).

    Writes a PNG grid and report.txt with the judge's figures to --out.
    """
    from tqdm import tqdm

    from sdtune.demo import run_demo
    from sdtune.paths import check_writable_dir

    from sdtune.models.loading import resolve_spec

    check_writable_dir(out, "--out")  # before a few minutes of work, not after
    resolve_spec(model)  # a missing model fails now, with the loader's message

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, file=sys.stderr))
        bar.n = done
        bar.refresh()

    result = run_demo(out, model=model, steps=steps, progress=progress)
    for bar in bars.values():
        bar.close()
    click.echo(result.report.read_text().rstrip())


def register(cli: click.Group) -> None:
    cli.add_command(demo)
