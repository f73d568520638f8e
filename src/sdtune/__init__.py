"""sdtune: personalize Stable Diffusion models from local files."""

__version__ = "0.1.0"
