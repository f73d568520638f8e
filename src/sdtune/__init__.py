"""sdtune: personalize Stable Diffusion models from local files."""

__version__ = "0.1.0"

from sdtune.generate import Generator  # noqa: E402  (after __version__, which it uses)
