"""A1111 infotext: the `parameters` PNG text chunk that A1111, ComfyUI importers and image sites read.

Format (one string):

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>     (line omitted when there is no negative prompt)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: abcdef1234, Model: name

The last line is `key: value` pairs joined by ", "; a value that contains ',', ':' or a newline is written as a
JSON string (so it can be read back unambiguously). Writing and parsing follow that format exactly so files made
here load in A1111's "PNG Info" tab and A1111's files load here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

# key: value, where value is a JSON string (with escapes) or runs up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/()+.]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass
class Infotext:
    """A parsed infotext: prompt, negative prompt and the ordered `key: value` fields (values as strings)."""

    prompt: str = ""
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def format_value(value: Any) -> str:
    """A1111's value formatting: whole floats without '.0', JSON-quote text containing ',', ':' or newlines."""
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    else:
        text = str(value)
    if "," in text or ":" in text or "\n" in text or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)  # A1111 quotes on , : and newline; the rest keeps round-trips exact
    return text


def add_infotext_field(infotext: str, key: str, value: str | None) -> str:
    """Insert `key: value` into an infotext's parameter line before `Version:` (A1111's order), quoting the value
    as A1111 does. None leaves the text unchanged."""
    if value is None:
        return infotext
    field = f"{key}: {format_value(value)}"
    head, sep, last = infotext.rpartition("\n")
    marker = ", Version: "
    if marker in last:
        i = last.rindex(marker)
        last = f"{last[:i]}, {field}{last[i:]}"
    elif last.startswith("Version: "):
        last = f"{field}, {last}"
    else:
        last = f"{last}, {field}" if last else field
    return f"{head}{sep}{last}"


def format_infotext(prompt: str, negative_prompt: str, fields: dict[str, Any]) -> str:
    """Build the `parameters` text. Fields whose value is None are left out; order is kept."""
    line = ", ".join(f"{k}: {format_value(v)}" for k, v in fields.items() if v is not None)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _parse_fields(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    line = line.strip()
    while pos < len(line):
        m = _PAIR.match(line, pos)
        if m is None or m.end() == pos:
            break
        key, value = m.group(1).strip(), m.group(2).strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
        pos = m.end()
    return out


def _is_fields_line(line: str) -> bool:
    """A1111's rule: the last line holds the parameters when it has at least 3 `key: value` pairs."""
    return len(_parse_fields(line)) >= 3


def parse_infotext(text: str) -> Infotext:
    """Read an infotext back (the inverse of `format_infotext`, and tolerant of A1111's own files)."""
    lines = text.strip("\n").split("\n")
    fields: dict[str, str] = {}
    if lines and _is_fields_line(lines[-1]):
        fields = _parse_fields(lines.pop())
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith(NEGATIVE_PREFIX):
            negative_lines = [line[len(NEGATIVE_PREFIX):].lstrip(" ")]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return Infotext("\n".join(prompt_lines).strip(), "\n".join(negative_lines or []).strip(), fields)


def png_info(text: str) -> Any:
    """A PIL `PngInfo` holding `text` as the `parameters` chunk (iTXt when it is not Latin-1, like A1111)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    try:
        text.encode("latin-1")
        info.add_text(PNG_KEY, text)
    except UnicodeEncodeError:
        info.add_itxt(PNG_KEY, text)
    return info


def read_png_infotext(path: str | Path) -> str:
    """The `parameters` text of a PNG, or a one-line SdtuneError saying why there is none."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SdtuneError(f"{path}: no such file; give the path of a PNG made by sdtune or A1111")
    try:
        with Image.open(path) as im:
            im.load()
            text = im.info.get(PNG_KEY)
    except (UnidentifiedImageError, OSError) as exc:
        raise SdtuneError(f"{path}: not a readable image ({exc}); give a PNG made by sdtune or A1111") from None
    if not isinstance(text, str) or not text.strip():
        raise SdtuneError(f"{path} has no A1111 '{PNG_KEY}' text chunk, so its settings are unknown; "
                          "give a PNG saved by sdtune or A1111 with metadata, or pass the settings as options")
    return text
