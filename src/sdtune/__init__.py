"""sdtune: personalize Stable Diffusion models from local files."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdtune.version import __version__

if TYPE_CHECKING:
    from sdtune.generate import Generator

__all__ = ["Generator", "__version__"]


def __getattr__(name: str) -> Any:
    """`sdtune.Generator` on first use: importing the package (the CLI's entry point does) stays light, so a
    Ctrl-C while torch loads reaches the CLI's handler instead of printing a traceback."""
    if name == "Generator":
        from sdtune.generate import Generator

        return Generator
    raise AttributeError(f"module 'sdtune' has no attribute {name!r}")
