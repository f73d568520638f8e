"""sdtune: personalize Stable Diffusion models from local files."""

from sdtune.generate import Generator
from sdtune.version import __version__

__all__ = ["Generator", "__version__"]
