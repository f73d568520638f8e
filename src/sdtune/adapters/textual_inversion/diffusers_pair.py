"""diffusers' SDXL textual inversion output: one embedding in two files.

diffusers' examples/textual_inversion/textual_inversion_sdxl.py saves `{placeholder_token: [n, width]}` twice
(`save_progress`, safetensors with metadata {"format": "pt"}, or a torch .bin): `learned_embeds.safetensors` from
text_encoder_1 (CLIP-L, [n, 768]) and `learned_embeds_2.safetensors` from text_encoder_2 (OpenCLIP-bigG, [n, 1280]);
intermediate saves are `learned_embeds-steps-N.safetensors` / `learned_embeds_2-steps-N.safetensors`. Read alone,
each is half an SDXL embedding; A1111 and ComfyUI want one file with `clip_l` and `clip_g`. This module only knows
the names (which file is which, where the partner is); `files.read_embedding` joins the two.
"""

from __future__ import annotations

import re
from pathlib import Path

PAIR_RE = re.compile(r"^learned_embeds(?P<second>_2)?(?P<steps>-steps-\d+)?\.(?P<ext>safetensors|bin)$")


def pair_of(path: str | Path) -> tuple[Path, Path] | None:
    """(CLIP-L file, OpenCLIP-G file) when `path` is either file of a diffusers SDXL pair and both exist in its
    folder; else None (a lone learned_embeds file is an ordinary one-encoder diffusers embedding)."""
    p = Path(path)
    m = PAIR_RE.match(p.name)
    if m is None:
        return None
    first = p.with_name(f"learned_embeds{m['steps'] or ''}.{m['ext']}")
    second = p.with_name(f"learned_embeds_2{m['steps'] or ''}.{m['ext']}")
    return (first, second) if first.is_file() and second.is_file() else None


def is_second_of_pair(path: str | Path) -> bool:
    """Whether `path` is the text_encoder_2 half of a complete pair (read together with its partner)."""
    pair = pair_of(path)
    return pair is not None and pair[1] == Path(path)
