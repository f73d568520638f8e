"""Image generation (txt2img) with A1111 conventions: sampler names, seeds, infotext, file naming."""

from sdtune.generate.conditioning import PromptEmbeds, PromptEncoder, encode_with_pipeline
from sdtune.generate.generator import GeneratedImage, Generator
from sdtune.generate.params import DEFAULT_SAMPLER, GenerationParams, params_from_infotext
from sdtune.generate.pnginfo import Infotext, format_infotext, parse_infotext, read_png_infotext
from sdtune.generate.samplers import get_sampler, make_scheduler, sampler_names

__all__ = [
    "DEFAULT_SAMPLER", "GeneratedImage", "GenerationParams", "Generator", "Infotext", "PromptEmbeds",
    "PromptEncoder", "encode_with_pipeline", "format_infotext", "get_sampler", "make_scheduler",
    "params_from_infotext", "parse_infotext", "read_png_infotext", "sampler_names",
]
