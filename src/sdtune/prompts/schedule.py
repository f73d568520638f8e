"""A1111 prompt editing: `[from:to:when]`, `[to:when]`, `[from::when]` and alternation `[a|b]`.

`prompt_schedule(text, steps)` returns A1111's schedule, a list of `[end_step, text]`: the text to encode and the
last step it is used for (A1111's `get_learned_conditioning_prompt_schedules`, same values for the same input).

- `when` with a decimal point (`0.5`, `.25`, `1.0`) is a fraction of the steps: end = int(when * steps); without one
  (`10`) it is a step number. Either is capped at `steps`; an end below 1 means `to` from the start. (This is A1111's
  current rule; its old one, "below 1 is a fraction", is not used.)
- `[from:to:when]` gives `from` up to step `when`, then `to`; `[to:when]` adds `to` after; `[from::when]` removes.
- `[a|b|c]` cycles a, b, c, a, ... one step each; empty options are allowed (`[fe|]male`).
- Brackets that do not form one of these (or `(x)`, `(x:w)`, `[x]`) are left as text at the top level. A `|`
  outside an alternation, a lone trailing backslash or a backslash before a newline make the whole prompt
  unscheduled (A1111: a parse error, the prompt is used as is). Prompts whose brackets nest deeper than
  `MAX_DEPTH` are not scanned (used as is) rather than risking deep recursion.

Which entry a sampling step uses is A1111's rule too (`entry_for_step`): at 0-based sampling step i, the first
entry whose end_step >= i. So `[a:b:3]` with 10 steps uses `a` for steps 0-3 (four steps) and `b` for 4-9.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MAX_DEPTH = 100
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # '.' excludes a newline, as in A1111's grammar


@dataclass
class _Emph:
    open: str
    first: list
    second: list | None
    close: str


@dataclass
class _Sched:
    before: list | None
    after: list
    when: str
    end: int = 0


@dataclass
class _Alt:
    options: list = field(default_factory=list)


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.memo: dict[int, tuple[object, int] | None] = {}

    def prompt(self, i: int) -> tuple[list, int]:
        """Items (plain text and constructs) from i; stops at a char it cannot take (or an opener that fails)."""
        s, items = self.s, []
        while i < len(s):
            c = s[i]
            if c in "([":
                got = self.construct(i)
                if got is None:
                    break
                items.append(got[0])
                i = got[1]
                continue
            m = _PLAIN.match(s, i)
            if not m:
                break
            items.append(m.group(0))
            i = m.end()
        return items, i

    def construct(self, i: int) -> tuple[object, int] | None:
        if i not in self.memo:
            self.memo[i] = self._construct(i)
        return self.memo[i]

    def _construct(self, i: int) -> tuple[object, int] | None:
        s = self.s
        first, j = self.prompt(i + 1)
        c = s[j] if j < len(s) else ""
        if s[i] == "(":
            if c == ")":
                return _Emph("(", first, None, ")"), j + 1
            if c == ":":
                second, k = self.prompt(j + 1)
                if k < len(s) and s[k] == ")":
                    return _Emph("(", first, second, ")"), k + 1
            return None
        if c == "]":
            return _Emph("[", first, None, "]"), j + 1
        if c == "|":
            alt = _Alt([first])
            while j < len(s) and s[j] == "|":
                option, j = self.prompt(j + 1)
                alt.options.append(option)
            return (alt, j + 1) if j < len(s) and s[j] == "]" else None
        if c != ":":
            return None
        m = _NUMBER.match(s, j + 1)
        if m:  # [to:when]
            return _Sched(None, first, m.group(1)), m.end()
        second, k = self.prompt(j + 1)
        if k < len(s) and s[k] == ":":
            m = _NUMBER.match(s, k + 1)
            if m:  # [from:to:when]
                return _Sched(first, second, m.group(1)), m.end()
        return None


def _depth(text: str) -> int:
    depth = deepest = 0
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def parse_schedule_tree(text: str) -> list | None:
    """The prompt as a tree of text and constructs, or None where A1111's parser fails (see module doc)."""
    if _depth(text) > MAX_DEPTH:
        return None
    p = _Parser(text)
    items: list = []
    i = 0
    while True:
        got, i = p.prompt(i)
        items.extend(got)
        if i >= len(text):
            return items
        if text[i] in "[]():":
            items.append(text[i])  # a stray bracket or colon at the top level stays text
            i += 1
        else:  # '|' outside an alternation, or a backslash that escapes nothing
            return None


def _walk(items: list):
    for item in items:
        if isinstance(item, str):
            continue
        yield item
        if isinstance(item, _Emph):
            yield from _walk(item.first)
            yield from _walk(item.second or [])
        elif isinstance(item, _Sched):
            yield from _walk(item.before or [])
            yield from _walk(item.after)
        else:
            for option in item.options:
                yield from _walk(option)


def _end_step(when: str, steps: int) -> int:
    value = float(when) * steps if "." in when else float(when)
    if not math.isfinite(value):
        return steps if value > 0 else 0
    return min(steps, int(value))


def _text_at(items: list, step: int) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Emph):
            out.append(item.open + _text_at(item.first, step))
            if item.second is not None:
                out.append(":" + _text_at(item.second, step))
            out.append(item.close)
        elif isinstance(item, _Sched):
            out.append(_text_at(item.before or [], step) if step <= item.end else _text_at(item.after, step))
        else:
            out.append(_text_at(item.options[(step - 1) % len(item.options)], step))
    return "".join(out)


def prompt_schedule(text: str, steps: int) -> list[list]:
    """A1111's schedule of `text` for `steps` sampling steps: `[[end_step, text], ...]`, ends ascending, the last
    one `steps`."""
    steps = max(1, int(steps))
    tree = parse_schedule_tree(text)
    if tree is None:
        return [[steps, text]]
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Sched):
            node.end = _end_step(node.when, steps)
            if node.end >= 1:
                ends.add(node.end)
        elif isinstance(node, _Alt):
            ends.update(range(1, steps + 1))
    return [[end, _text_at(tree, end)] for end in sorted(ends)]


def entry_for_step(ends: list[int], step: int) -> int:
    """Index of the schedule entry used at 0-based sampling step `step` (A1111: first end >= step)."""
    for index, end in enumerate(ends):
        if step <= end:
            return index
    return len(ends) - 1
