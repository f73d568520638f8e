"""Captions: reading sidecar files, A1111 prompt templates ([name], [filewords]) and caption augmentations
(tag shuffle keeping the first N tags, tag dropout, whole-caption dropout). Pure functions; randomness comes from
a seeded `random.Random`."""

from __future__ import annotations

import random
import re
from pathlib import Path

CAPTION_EXTS = (".txt", ".caption")


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """(caption text, problem or None). UTF-8 with or without BOM, UTF-16 with BOM; anything else is read as
    Latin-1 and reported. Lines are joined with spaces and runs of whitespace collapsed."""
    problem = None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text, problem = data.decode("latin-1"), "not UTF-8 (read as Latin-1; re-save it as UTF-8)"
    return " ".join(text.split()), problem


def find_caption(image: Path, exts: tuple[str, ...] = CAPTION_EXTS) -> Path | None:
    """The sidecar caption of `image`: <stem><ext> for the first ext that exists."""
    for ext in exts:
        p = image.with_suffix(ext)
        if p.is_file():
            return p
    return None


def fill_template(template: str, caption: str, token: str) -> str:
    """A1111's TI template: "[name]" becomes `token`, "[filewords]" the image's caption. Separators left dangling
    by an empty caption are removed: "a photo of [name], [filewords]" with no caption -> "a photo of sks"."""
    text = template.replace("[name]", token).replace("[filewords]", caption.strip())
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)          # "a , b" -> "a, b"
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)   # ", ," -> ","
    return text.strip().strip(",;:").strip()


def split_tags(caption: str, sep: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(sep) if t.strip()]


def shuffle_tags(caption: str, rng: random.Random, *, keep_first: int = 0, sep: str = ",") -> str:
    """Shuffle comma-separated tags, keeping the first `keep_first` in place (kohya's keep_tokens)."""
    tags = split_tags(caption, sep)
    head, tail = tags[:keep_first], tags[keep_first:]
    rng.shuffle(tail)
    return f"{sep} ".join(head + tail)


def drop_tags(caption: str, rng: random.Random, rate: float, *, keep_first: int = 0, sep: str = ",") -> str:
    """Drop each tag after the first `keep_first` with probability `rate`."""
    tags = split_tags(caption, sep)
    kept = tags[:keep_first] + [t for t in tags[keep_first:] if rng.random() >= rate]
    return f"{sep} ".join(kept)


def augment_caption(caption: str, rng: random.Random, *, shuffle: bool = False, keep_first: int = 0,
                    tag_dropout: float = 0.0, caption_dropout: float = 0.0) -> str:
    """Caption dropout (the whole caption becomes "" with probability caption_dropout), then tag dropout, then
    shuffle. With everything off the caption is returned unchanged (not even re-joined)."""
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    if tag_dropout > 0:
        caption = drop_tags(caption, rng, tag_dropout, keep_first=keep_first)
    if shuffle:
        caption = shuffle_tags(caption, rng, keep_first=keep_first)
    return caption
