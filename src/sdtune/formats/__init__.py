"""Safe reading (and atomic writing) of weight files, identification of what a file is, and single-file export."""

from sdtune.formats.checkpoint import save_single_file
from sdtune.formats.identify import FileInfo, identify
from sdtune.formats.safe_io import (
    load_pickle,
    read_safetensors_header,
    read_safetensors_metadata,
    read_shapes,
    read_state_dict,
    save_safetensors_atomic,
)

__all__ = ["FileInfo", "identify", "load_pickle", "read_safetensors_header", "read_safetensors_metadata",
           "read_shapes", "read_state_dict", "save_safetensors_atomic", "save_single_file"]
