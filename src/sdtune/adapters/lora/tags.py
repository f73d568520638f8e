"""A1111 conventions around LoRA use: `<lora:name:weight>` tags resolved to files, `--lora FILE[:W]`, and the
infotext field `Lora hashes: "name: hash, ..."` (hash = A1111's / kohya's short hash: the first 12 hex digits of the
sha256 of a .safetensors file's tensor data, i.e. everything after the JSON header, so editing metadata does not
change it; other files: sha256 of the whole file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from sdtune.adapters.args import parse_file_weight
from sdtune.adapters.tags import TagKind, resolve_tags
from sdtune.errors import SdtuneError
from sdtune.models.hashing import memo_sha256

LORA_TAGS = TagKind(tag="lora", kinds=("lora", "lyco"), noun="LoRA", dir_option="--lora-dir",
                    exts=(".safetensors", ".pt", ".ckpt", ".bin"))


def lora_short_hash(path: str | Path) -> str:
    """A1111's LoRA short hash (12 hex digits)."""
    return memo_sha256(path, tensor_data_only=True)[:12]


def _clean_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")  # A1111 drops the field separators from names


def lora_hashes_value(entries: Iterable[tuple[str, str]]) -> str | None:
    """The value of A1111's `Lora hashes` field: "name: hash, name2: hash2" (None when empty)."""
    parts = [f"{_clean_name(n)}: {h}" for n, h in entries if h]
    return ", ".join(parts) or None


def parse_lora_arg(text: str, option: str = "--lora") -> tuple[str, float]:
    """`FILE[:WEIGHT]` -> (FILE, weight); the weight defaults to 1 (a `C:\\...` drive letter is not a weight)."""
    return parse_file_weight(text, option, "weight")


def check_one_weight(tag: Any) -> None:
    """Refuse A1111's separate weights, `<lora:name:te:unet[:dyn]>` or `te=`/`unet=`/`dyn=`: sdtune applies one
    weight to the text encoder and the UNet, so such a tag would silently give another image than A1111's.
    `<lora:name:w:w>` (both the same) means one weight and passes."""
    args = list(getattr(tag, "args", ()))
    written = [getattr(tag, "weight_text", "")] + args
    named = any("=" in a for a in written)
    if named or len(args) > 1 or (args and _number(args[0]) != tag.weight):
        raise SdtuneError(f"<{tag.kind}:{tag.name}:{':'.join(written)}>: separate text-encoder and UNet weights "
                          f"(A1111's <lora:name:te:unet>, te=, unet=, dyn=) are not supported; use one weight for "
                          f"both, e.g. <{tag.kind}:{tag.name}:{tag.weight:g}>")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def resolve_lora_tags(tags: Iterable[Any], search_dirs: Sequence[str | Path]) -> list[tuple[Path, float]]:
    """`<lora:name:weight>` (and `<lyco:...>`) tags -> [(file, weight)], in tag order (`adapters.tags`)."""
    tags = list(tags)
    for tag in tags:
        check_one_weight(tag)
    return resolve_tags(LORA_TAGS, tags, search_dirs)
