"""CLI: `sdtune train <method>` - one command per training method, its options built from `TrainConfig` (and the
method's `Options`), so names, help and defaults have one source of truth."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from sdtune.errors import SdtuneError


@click.group("train")
def train_group() -> None:
    """Train a personalisation method on a folder of images (+ .txt captions).

    Settings come from defaults < the saved run (with --resume) < --config FILE.toml < flags. The effective
    settings are written to OUT/config.toml, so `--config OUT/config.toml --out NEW` repeats a run.

    \b
    OUT/ holds:
      <name>.safetensors      the result: the best checkpoint (by --select-by: validation loss when
                              there is a validation set, a judge metric with --judge, else the last)
      checkpoints/            evaluated checkpoints (--keep-checkpoints all|best|last)
      samples/                sample grids (--sample-every N --sample-prompt TEXT)
      state/                  the resumable state (Ctrl-C / SIGTERM save it; continue with --resume)
      cv/                     with --cv-folds K: fold-0..K-1 runs and report.json (the step for --steps auto)
      log.jsonl, summary.csv, summary.json, config.toml, config.json
    """


def _config_from_cli(method: str, config_file: Path | None, values: dict[str, Any],
                     option_names: set[str]) -> Any:
    from sdtune.training.checkpoint import StateStore
    from sdtune.training.config import TrainConfig

    given = {k: v for k, v in values.items() if v is not None and v != ()}
    method_values = {k: v for k, v in given.items() if k in option_names}
    flags: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()
                             if k not in option_names}
    file_cfg = TrainConfig.from_toml(config_file) if config_file is not None else None
    if file_cfg is not None and file_cfg.method != method:
        raise SdtuneError(f"{config_file} configures method {file_cfg.method!r}; run `sdtune train "
                          f"{file_cfg.method} --config {config_file}`")
    base = TrainConfig(method=method)
    resume = flags.get("resume", file_cfg.resume if file_cfg else None)
    out = flags.get("out", file_cfg.out if file_cfg else None)
    if resume is not None and out is not None:  # continue with the saved run's settings unless overridden
        store = StateStore(Path(out).expanduser() / "state")
        try:
            saved = store.load(None if resume == "auto" else resume)
        except SdtuneError:
            saved = None  # nothing saved yet ("auto" then starts a new run) or an error the trainer reports
        if saved is not None and saved.config.get("method") not in (None, method):
            other = saved.config["method"]  # refused before the model loads, with the command that resumes it
            raise SdtuneError(f"{out} holds a {other!r} run, not {method!r}: resume it with `sdtune train {other} "
                              f"--out {out} --resume`, or choose another --out")
        if saved is not None:
            base = TrainConfig.from_dict(saved.config, source=str(saved.path))
    if config_file is not None:
        base = TrainConfig.from_toml(config_file, base=base)
    return base.merged(flags, source="command line", method_options=method_values)


def _make_command(name: str, cls: Any) -> click.Command:
    from sdtune.cli.config_options import click_options
    from sdtune.training.config import TrainConfig

    option_fields = list(dataclasses.fields(cls.Options))
    option_names = {f.name for f in option_fields}
    clash = option_names & {f.name for f in TrainConfig.fields()}
    assert not clash, f"{name} options clash with TrainConfig: {clash}"

    def command(config_file: Path | None, dry_run: bool, **values: Any) -> None:
        from sdtune.training.loop import train

        from sdtune.toy.concept_eval import evaluator_for

        from sdtune.paths import remove_if_unused
        from sdtune.training.crossval import check_cv_data, cross_validate
        from sdtune.training.folds import resolve_auto_steps

        def say(text: str) -> None:
            click.echo(text, err=True)

        cfg = _config_from_cli(name, config_file, values, option_names)
        if dry_run:
            cfg.validate()
            if cfg.cv_folds:
                check_cv_data(cfg)
            evaluator_for(cfg)  # the toy judge's settings are checked too
            click.echo(resolve_auto_steps(cfg, say).to_toml())
            return
        cfg.check_values()
        fresh = not cfg.out_dir.exists()
        try:
            if cfg.cv_folds:  # K fold runs, a report, a recommended step (`training.crossval`)
                cv = cross_validate(cfg, evaluator=evaluator_for(cfg))
                click.echo(cv.table)
                if cv.stopped == "interrupted":
                    sys.exit(130)
                click.echo(f"report: {cv.out / 'report.json'}; train on all images to the recommended step with "
                           "the same options, --steps auto instead of --steps and --cv-folds")
                return
            cfg = resolve_auto_steps(cfg, say)  # steps auto: refused now if there is no finished cross-validation
            result = train(cfg, evaluator=evaluator_for(cfg))
        except BaseException:
            if fresh:  # refused input (empty data, bad target, ...): no empty --out folder is left behind
                remove_if_unused(cfg.out_dir)
            raise
        if result.stopped == "interrupted":
            sys.exit(128 + (result.signal or 2))

    command.__doc__ = (f"{cls.summary or name}\n\n\b\nExamples:\n  sdtune train {name} --data data/heart --out "
                       f"runs/heart --steps 500 --lr 1e-4\n  sdtune train {name} --config run.toml --steps 800\n"
                       f"  sdtune train {name} --out runs/heart --resume")
    for decorate in reversed(click_options(TrainConfig.fields()) + click_options(option_fields)):
        command = decorate(command)
    command = click.option("--dry-run", is_flag=True, help="Check the settings and print them; train nothing.")(
        command)
    command = click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                           default=None, help="TOML file with settings (flags override it).")(command)
    return click.command(name, context_settings={"max_content_width": 110})(command)


def register(cli: click.Group) -> None:
    from sdtune.training.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        if getattr(cls, "public", True) and name not in train_group.commands:
            train_group.add_command(_make_command(name, cls))
    cli.add_command(train_group)
