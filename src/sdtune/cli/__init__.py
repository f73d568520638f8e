"""The `sdtune` command line. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import os
import sys

import click

from sdtune.version import __version__
from sdtune.errors import SdtuneError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="sdtune")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Personalize Stable Diffusion models from local files.

    Every model is a local path (diffusers folder, .safetensors or .ckpt file) or `tiny`,
    the bundled toy model that runs on any CPU. Nothing is downloaded.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from sdtune.cli import convert, dataset, demo, generate, info, merge, prompt, recipe, toy, train, ui

    for module in (convert, dataset, demo, generate, info, merge, prompt, recipe, toy, train, ui):
        module.register(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns user errors into one line and a non-zero exit."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        _register()  # imports the commands' modules: a Ctrl-C in the first second lands here
    except KeyboardInterrupt:
        click.echo("aborted", err=True)
        sys.exit(130)
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    for i, arg in enumerate(args):  # only in-process callers can pass one (a C argv cannot hold NUL)
        if "\0" in arg:
            _fail(f"argument {i + 1} ({arg.split(chr(0))[0][:40]!r}...) contains a NUL byte; retype it", 2)
    try:
        cli.main(args=args, prog_name="sdtune", standalone_mode=False)
    except SdtuneError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns a Ctrl-C inside a command into Abort
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other error; the usage text is one --help away
        where = exc.ctx.command_path if exc.ctx is not None else "sdtune"
        _fail(f"{exc.format_message()} (see `{where} --help`)", exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Safety net, not the fix: commands check their paths before working (sdtune.paths) and their writers map
        # a full disk themselves; a refusal by the OS that still gets here is one line, not a traceback.
        from sdtune.paths import os_error

        mapped = os_error(exc)
        if mapped is None or debug:
            raise
        _fail(str(mapped), mapped.exit_code)


def _fail(message: str, code: int) -> None:
    """Print `error: MESSAGE` as one line on stderr and exit with `code`."""
    line = " ".join(part.strip() for part in message.splitlines())  # a user reads the first line only
    line = line.encode("utf-8", "backslashreplace").decode("utf-8")  # invalid UTF-8 from argv, shown escaped
    click.echo(f"error: {line}", err=True)
    sys.exit(code)
