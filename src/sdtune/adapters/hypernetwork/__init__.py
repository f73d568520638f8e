"""Hypernetworks (A1111's architecture and files): residual MLPs on the inputs of attention's to_k/to_v, per
context width. `network` (the modules), `io` (A1111 .pt and safetensors files), `apply` (a diffusers attention
processor; several hypernetworks with strengths), `tags` (`--hypernetwork FILE:S`, `<hypernet:name:S>`)."""

from sdtune.adapters.hypernetwork.apply import PipelineHypernetworks, apply_hypernetworks, context_widths
from sdtune.adapters.hypernetwork.io import read_hypernetwork, save_hypernetwork
from sdtune.adapters.hypernetwork.network import ACTIVATIONS, WEIGHT_INITS, Hypernetwork, HypernetworkSettings
from sdtune.adapters.hypernetwork.tags import parse_hypernetwork_arg, resolve_hypernet_tags

__all__ = ["ACTIVATIONS", "WEIGHT_INITS", "Hypernetwork", "HypernetworkSettings", "PipelineHypernetworks",
           "apply_hypernetworks", "context_widths", "parse_hypernetwork_arg", "read_hypernetwork",
           "resolve_hypernet_tags", "save_hypernetwork"]
