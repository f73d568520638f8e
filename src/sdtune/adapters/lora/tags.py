"""A1111 conventions around LoRA use: `<lora:name:weight>` tags resolved to files, `--lora FILE[:W]`, and the
infotext field `Lora hashes: "name: hash, ..."` (hash = A1111's / kohya's short hash: the first 12 hex digits of the
sha256 of a .safetensors file's tensor data, i.e. everything after the JSON header, so editing metadata does not
change it; other files: sha256 of the whole file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from sdtune.adapters.args import parse_file_weight
from sdtune.adapters.lora.weight import LoraWeight
from sdtune.adapters.tags import TagKind, resolve_tags
from sdtune.errors import SdtuneError
from sdtune.models.hashing import memo_sha256
from sdtune.prompts.extra_networks import finite_number

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


def lora_hashes_names(value: str) -> list[str]:
    """The LoRA names of a `Lora hashes` field's value (what `lora_hashes_value` wrote, quotes or not)."""
    return [n for n in (part.split(":")[0].strip() for part in value.strip().strip('"').split(",")) if n]


def parse_lora_arg(text: str, option: str = "--lora") -> tuple[str, float]:
    """`FILE[:WEIGHT]` -> (FILE, weight); the weight defaults to 1 (a `C:\\...` drive letter is not a weight)."""
    return parse_file_weight(text, option, "weight")


def tag_weight(tag: Any) -> float | LoraWeight:
    """A1111's reading of a LoRA tag's arguments: `<lora:name:te:unet>` positionally or `te=`/`unet=` by name; the
    UNet's weight is the text encoder's unless given; one weight -> a number. `dyn` (a rank cut) is refused."""
    if isinstance(tag, (tuple, list)):  # (name, weight) pairs
        return float(tag[1]) if len(tag) > 1 else 1.0
    written = [getattr(tag, "weight_text", "")] + list(getattr(tag, "args", ()))
    if written[0] and "=" not in written[0] and finite_number(written[0]) is None:  # A1111 fails on it too
        raise SdtuneError(f"<{tag.kind}:{tag.name}:{':'.join(written)}>: the weight {written[0]!r} is not a number "
                          "(e.g. 0.5, with a dot)")
    if len(written) == 1 and "=" not in written[0]:
        return float(tag.weight)
    positional = [a for a in written if "=" not in a]
    named = dict(a.split("=", 1) for a in written if "=" in a)
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    label = f"<{tag.kind}:{tag.name}:{':'.join(written)}>"
    if unknown or "dyn" in named or len(positional) > 2:
        raise SdtuneError(f"{label}: sdtune reads <{tag.kind}:name:weight> or <{tag.kind}:name:te:unet> (also "
                          "te=, unet=); a third number or dyn= (A1111's rank cut) and other names are not supported")

    def number(text: str, what: str) -> float:
        value = finite_number(text)
        if value is None:
            raise SdtuneError(f"{label}: the {what} weight {text!r} is not a number")
        return value

    te = number(positional[0], "text-encoder") if positional and positional[0] else 1.0
    te = number(named["te"], "text-encoder") if "te" in named else te
    unet = number(positional[1], "UNet") if len(positional) > 1 else te
    unet = number(named["unet"], "UNet") if "unet" in named else unet
    return te if te == unet else LoraWeight(te, unet)


def resolve_lora_tags(tags: Iterable[Any], search_dirs: Sequence[str | Path]) -> list[tuple[Path, Any]]:
    """`<lora:name:weight>` (and `<lyco:...>`) tags -> [(file, weight)], in tag order (`adapters.tags`); a tag
    with separate text-encoder and UNet weights gives an `apply.LoraWeight`."""
    tags = [t for t in tags if isinstance(t, (tuple, list)) or getattr(t, "kind", "lora") in LORA_TAGS.kinds]
    weights = [tag_weight(t) for t in tags]  # bad arguments are refused before any file is looked up
    return [(path, w) for (path, _), w in zip(resolve_tags(LORA_TAGS, tags, search_dirs), weights)]
