"""`<lora:name:weight>` tags in prompts, applied at generation (A1111 behaviour).

Before each run `update_generator_loras(generator, prompt)` takes the lora/lyco tags out of the positive prompt,
resolves them to files (`resolve_lora_tags`) in the generator's `lora_dirs` (`--lora-dir`, repeatable) and then in
the folders of the LoRAs given with `--lora` / `loras=` / `set_loras`, and makes exactly those LoRAs plus the fixed
ones active (`PipelineLoras.set`): files load once and are kept, so LoRAs switch on, off and change weight between
images without reloading the model. The same file in a tag and in --lora: the weights add up (as two A1111 tags).
The prompt text itself keeps its tags, so the infotext reads like A1111's (plus `Lora hashes`).

Tags in the negative prompt are not applied (A1111 ignores them too); a warning says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def search_dirs(generator: Any) -> list[Path]:
    """--lora-dir folders first, then the folders of the fixed --lora files (deduplicated, in order)."""
    from sdtune.adapters.lora.apply import parse_specs

    dirs: list[Path] = [Path(d).expanduser() for d in (getattr(generator, "lora_dirs", None) or [])]
    for src, _ in parse_specs(getattr(generator, "_lora_fixed", None) or []):
        if isinstance(src, (str, Path)):
            dirs.append(Path(src).expanduser().parent)
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def update_generator_loras(generator: Any, prompt: str, negative_prompt: str = "") -> None:
    """Make the fixed LoRAs plus this prompt's tags active on `generator` (see the module docstring)."""
    from sdtune.adapters.lora.tags import LORA_TAGS, resolve_lora_tags
    from sdtune.adapters.tags import prompt_tags

    tags = prompt_tags(LORA_TAGS, prompt)
    neg = prompt_tags(LORA_TAGS, negative_prompt)
    if neg:
        log.warning("LoRA tags in the negative prompt are not applied (as in A1111): %s",
                    ", ".join(f"<{n.kind}:{n.name}:{n.weight:g}>" for n in neg))
    if not tags and not getattr(generator, "_lora_tagged", False):
        return  # nothing from prompts now or before: the fixed LoRAs stay as set_loras left them
    files = resolve_lora_tags(tags, search_dirs(generator)) if tags else []
    specs = list(getattr(generator, "_lora_fixed", None) or []) + files
    if generator._loras is None:
        if not specs:
            generator._lora_tagged = False
            return
        from sdtune.adapters.lora.apply import PipelineLoras

        generator._loras = PipelineLoras.for_pipeline(generator.model)
    generator._loras.set(specs)
    generator._lora_tagged = bool(tags)
