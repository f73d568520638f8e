"""Running `sdtune ...` in-process from tests: click ends every command with SystemExit, which tests want as an
exit code next to the captured output."""

from __future__ import annotations

from typing import Any, NamedTuple


class CliResult(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        """stdout and stderr together, for checks that do not care which stream a line went to."""
        return self.out + self.err


def exit_code(argv: list[str]) -> int:
    """Run `sdtune ARGV`; its exit code (0 when the command returns)."""
    from sdtune.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run_cli(argv: list[str], capsys: Any) -> CliResult:
    """Run `sdtune ARGV` and read what it printed from pytest's `capsys`."""
    code = exit_code(argv)
    out = capsys.readouterr()
    return CliResult(code, out.out, out.err)
