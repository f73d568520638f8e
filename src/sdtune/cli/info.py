"""CLI: `sdtune info` (under construction in this session)."""

import click


def register(cli: click.Group) -> None:
    pass
