"""compel's prompt grammar, read the way compel's own parser reads it, into compel's structure.

Why a parser of our own: compel parses with pyparsing, whose alternatives are tried in a fixed order and, once one
matches, never revisited. The results that follow from that (which brackets stay text, where words are split, how
fragment texts are joined) are what compel's users see, and its test suite pins them down. This module makes the
same choices in the same order, written as a recursive-descent parser with a memo per (position, depth), so long
or hostile prompts stay fast and recursion is bounded (`MAX_DEPTH`). It returns compel's structure
(`CConjunction` of `CBlend`s / prompts of `CFragment`s and `CSwap`s, raw weights); `compel.py` turns that into
sdtune's encoder input. The rules, in compel's order:

- Before parsing, a comma directly followed by a non-space gets a space (`a,b` -> `a, b`).
- Top level: at each position the first of swap (`x.swap(y)`), attention (`x.attend(w)`, `(x)w`, `"x"w`,
  `word+`), quoted group, round group, then any run of non-space characters as plain text. So a `(` or `"` that
  does not close stays text, and so does anything glued to it (`(formed`).
- Inside a group (round or quoted) words end at `( ) " , . + - =`; `,` and `.` become words of their own (so
  `(a text.)` reads `a text .`); a `+`/`-` followed by a letter belongs to the word (`+test`). A group whose
  content cannot be read this way (an unclosed `(` inside, a lone `=`) is not a group.
- Fragments of equal weight are joined with one space; weights multiply inward; `+`/`-` signs are 1.1 / 0.9 per
  sign, a number is the weight itself.
- `("a", "b").blend(w...)` / `.and(w...)` / `.add(...)` are calls on the whole prompt; their weight counts must
  match the prompts (or be absent).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.prompts.compel_nodes import (
    CBlend,
    CConjunction,
    CFragment,
    CSwap,
    _Att,
    _Swap,
    flatten,
    fuse,
    unescape,
)

UP, DOWN = 1.1, 0.9
MAX_DEPTH = 20  # groups nested deeper are text (compel itself takes minutes at 10 levels: it backtracks)
WS = " \t\n\r\x0b\x0c"
SYNTAX = '(),".+-='
_NUMBER = re.compile(r"\d+\.\d*|\.\d+|\d+")  # an attention weight (a sign would have been read as +/- signs)
_SIGNED = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)|-?\d+")  # an option value or call weight
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+")
_QUOTED = re.compile(r'"((?:\\"|[^"\n\r])*)"')
_WS_ESCAPES = (("\\t", "\t"), ("\\n", "\n"), ("\\f", "\f"), ("\\r", "\r"))
Result = tuple[list, int] | None  # (nodes, end) of a rule that matched


def power(base: float, n: int) -> float:
    """base ** n, inf when it overflows (compel raises OverflowError for `a` and 7448 `+` signs)."""
    try:
        return base ** n
    except OverflowError:
        return float("inf")


class _Parser:
    """One text (the prompt, or the inside of a quoted group); memo tables make each rule run once per place."""

    def __init__(self, text: str):
        self.s, self.n = text, len(text)
        self.memo: dict[tuple, Any] = {}
        self.height = _bracket_heights(text)

    def ws(self, p: int) -> int:
        while p < self.n and self.s[p] in WS:
            p += 1
        return p

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def word(self, p: int) -> Result:
        """A word without syntax: escaped `\\(` etc., `+`/`-` followed by a letter, any other non-syntax char."""
        s, n = self.s, self.n
        p = i = self.ws(p)
        while i < n:
            c = s[i]
            if c == "\\" and i + 1 < n and s[i + 1] in SYNTAX:
                i += 2
            elif c in "+-":
                if i + 1 < n and s[i + 1] not in WS and s[i + 1] not in SYNTAX:
                    i += 1
                else:
                    break
            elif c in WS or c in SYNTAX:
                break
            else:
                i += 1
        return ([CFragment(unescape(s[p:i]))], i) if i > p else None

    def free_word(self, p: int) -> Result:
        i = p = self.ws(p)
        while i < self.n and self.s[i] not in WS:
            i += 1
        return ([CFragment(unescape(self.s[p:i]))], i) if i > p else None

    def quoted(self, p: int, depth: int, as_prompt: bool = False) -> Result:
        """`"..."`: the inside is parsed again on its own, as group content (or, in a call, as a whole prompt)."""
        p = self.ws(p)
        if p >= self.n or self.s[p] != '"':
            return None
        return self._cached(("q", p, depth, as_prompt), lambda: self._quoted(p, depth, as_prompt))

    def _quoted(self, p: int, depth: int, as_prompt: bool) -> Result:
        m = _QUOTED.match(self.s, p)
        if m is None or depth >= MAX_DEPTH:
            return None
        body = m.group(1)
        for lit, char in _WS_ESCAPES:
            body = body.replace(lit, char)
        body = body.replace('\\"', '"')
        if not body.strip():
            return [CFragment("")], m.end()
        inner = _Parser(body.replace('"', '\\"'))
        if as_prompt:
            return inner.prompt(depth + 1), m.end()
        nodes, end = inner.group_content(0, depth + 1, True)
        return (nodes, m.end()) if inner.ws(end) == inner.n else None

    def paren(self, p: int, depth: int) -> Result:
        p = self.ws(p)
        if p >= self.n or self.s[p] != "(" or depth + self.height.get(p, MAX_DEPTH + 1) > MAX_DEPTH:
            return None
        return self._cached(("p", p, depth), lambda: self._paren(p, depth))

    def _paren(self, p: int, depth: int) -> Result:
        nodes, end = self.group_content(p + 1, depth + 1, True)
        end = self.ws(end)
        return (nodes, end + 1) if end < self.n and self.s[end] == ")" else None

    def group_content(self, p: int, depth: int, punctuation: bool) -> tuple[list, int]:
        """Zero or more parts of a group: attention, swap, group, quoted group, word (and `,` `.` if allowed)."""
        return self._cached(("g", p, depth, punctuation), lambda: self._group_content(p, depth, punctuation))

    def _group_content(self, p: int, depth: int, punctuation: bool) -> tuple[list, int]:
        out: list = []
        while True:
            r = (self.attention(p, depth) or self.swap(p, depth) or self.paren(p, depth)
                 or self.quoted(p, depth) or self.word(p))
            if r is None and punctuation:
                q = self.ws(p)
                r = ([CFragment(self.s[q])], q + 1) if q < self.n and self.s[q] in ",." else None
            if r is None:
                return out, p
            out.extend(r[0])
            p = r[1]

    def target(self, p: int, depth: int) -> Result:
        return self.quoted(p, depth) or self.paren(p, depth) or self.word(p)

    def weight(self, p: int) -> tuple[float, int] | None:
        """`+++` (1.1 each), `--` (0.9 each) or a number, starting exactly at p."""
        s = self.s
        if p < self.n and s[p] in "+-":
            e = p
            while e < self.n and s[e] == s[p]:
                e += 1
            return power(UP if s[p] == "+" else DOWN, e - p), e
        m = _NUMBER.match(s, p)
        return (float(m.group(0)), m.end()) if m else None

    def _lit(self, p: int, text: str) -> int | None:
        p = self.ws(p)
        return p + len(text) if self.s.startswith(text, p) else None

    def attention(self, p: int, depth: int) -> Result:
        return self._cached(("a", p, depth), lambda: self._attention(p, depth))

    def _attention(self, p: int, depth: int) -> Result:
        t = self.target(p, depth)
        if t is not None:  # explicit: target.attend(w)
            e = self._lit(t[1], ".attend")
            e = self._lit(e, "(") if e is not None else None
            w = self.weight(self.ws(e)) if e is not None else None
            e = self._lit(w[1], ")") if w is not None else None
            if w is not None and e is not None:
                return [_Att(w[0], tuple(t[0]))], e
        g = self.quoted(p, depth) or self.paren(p, depth)
        if g is not None:  # implicit: (x)w or "x"w, nothing between
            w = self.weight(g[1])
            return ([_Att(w[0], tuple(g[0]))], w[1]) if w is not None else None
        t = self.word(p)
        if t is not None and t[1] < self.n and self.s[t[1]] in "+-":  # word+ / word--
            w = self.weight(t[1])
            assert w is not None
            return [_Att(w[0], tuple(t[0]))], w[1]
        return None

    def swap(self, p: int, depth: int) -> Result:
        return self._cached(("s", p, depth), lambda: self._swap(p, depth))

    def _swap(self, p: int, depth: int) -> Result:
        t = self.target(p, depth)
        e = self._lit(t[1], ".swap") if t is not None else None
        e = self._lit(e, "(") if e is not None else None
        if t is None or e is None:
            return None
        edited, e = self.group_content(e, depth + 1, False)
        options: list = []
        comma = self._lit(e, ",")
        if comma is not None:
            options, e = self.options(comma)
        end = self._lit(e, ")")
        return ([_Swap(tuple(t[0]), tuple(edited), tuple(options))], end) if end is not None else None

    def option(self, p: int) -> tuple[tuple, int] | None:
        """("kv", key, value) for `key=value`, ("num", x) for a number, ("flag", word) for a word."""
        p = self.ws(p)
        k = _KEYWORD.match(self.s, p)
        if k:
            e = self._lit(k.end(), "=")
            if e is not None:
                e = self.ws(e)
                v = _SIGNED.match(self.s, e)
                if v:
                    return ("kv", k.group(0), float(v.group(0))), v.end()
                v = _KEYWORD.match(self.s, e)
                if v:
                    return ("kv", k.group(0), v.group(0)), v.end()
        m = _SIGNED.match(self.s, p)
        if m:
            return ("num", float(m.group(0))), m.end()
        return (("flag", k.group(0)), k.end()) if k else None

    def options(self, p: int) -> tuple[list, int]:
        """A comma-separated option list, possibly empty (compel's `Dict(Optional(DelimitedList(option)))`)."""
        out: list = []
        o = self.option(p)
        while o is not None:
            out.append(o[0])
            p = o[1]
            comma = self._lit(p, ",")
            o = self.option(comma) if comma is not None else None
        return out, p

    def call(self) -> tuple[str, list, list, int] | None:
        """`(target, target...).blend|and|add(options)` at the start: (op, targets, options, end) or None."""
        e = self._lit(0, "(")
        items: list = []
        while e is not None:
            r = self.target(e, 0) or self.quoted(e, 0, as_prompt=True)
            if r is None:
                return None
            items.append(r[0])
            comma = self._lit(r[1], ",")
            if comma is None:
                e = self._lit(r[1], ")")
                break
            e = comma
        if e is None:
            return None
        for op, name in ((".blend", "blend"), (".and", "and"), (".add", "and")):
            after = self._lit(e, op)
            if after is not None:
                break
        else:
            return None
        e = self._lit(after, "(")
        if e is None:
            return None
        options, e = self.options(e)
        end = self._lit(e, ")")
        return (name, items, options, end) if end is not None else None

    def prompt(self, depth: int = 0) -> list:
        """A whole prompt: swap, attention, quoted or round group, else a run of non-space characters."""
        out: list = []
        p = self.ws(0)
        while p < self.n:
            r = (self.swap(p, depth) or self.attention(p, depth) or self.quoted(p, depth) or self.paren(p, depth)
                 or self.free_word(p))
            assert r is not None  # a free word always matches a non-space character
            out.extend(r[0])
            p = self.ws(r[1])
        return out


def _bracket_heights(text: str) -> dict[int, int]:
    """For each `(` that has a matching `)` (escapes as in a word, quotes ignored): how deep brackets nest inside
    it, itself included. A group that parses is such a bracket pair and nests exactly this deep, so a group too
    deep for MAX_DEPTH is refused here at once instead of after descending into it (linear on `((((...`)."""
    heights: dict[int, int] = {}
    stack: list[list[int]] = []  # [position, height so far]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in SYNTAX:
            i += 2
            continue
        if c == "(":
            stack.append([i, 1])
        elif c == ")" and stack:
            pos, h = stack.pop()
            heights[pos] = h
            if stack:
                stack[-1][1] = max(stack[-1][1], h + 1)
        i += 1
    return heights


def _call_weights(op: str, groups: list) -> tuple[list[float], bool]:
    """Numbers of a `.blend(...)` / `.and(...)`; a trailing `no_normalize` flag (blend only) turns normalising off."""
    normalize = True
    if op == "blend" and groups and groups[-1][0] == "flag" and groups[-1][1] == "no_normalize":
        normalize, groups = False, groups[:-1]
    weights = []
    for g in groups:
        try:
            weights.append(float(g[1]))
        except ValueError:
            raise SdtuneError(f"compel .{op}() takes numbers (and, for blend, a final no_normalize), "
                              f"not {g[1]!r}") from None
    return weights, normalize


def parse_structure(text: str, loras: tuple[tuple[str, float], ...] = ()) -> CConjunction:
    """compel's parse of `text` (with `withLora(...)` calls already taken out; `loras` are put in the result)."""
    text = re.sub(r",(\S)", r", \1", text)
    if not text.strip():
        return CConjunction(((CFragment(""),),), (1.0,), loras)
    parser = _Parser(text)
    call = parser.call()
    if call is None:
        prompt = fuse(flatten(parser.prompt(), 1.0))
        return CConjunction((prompt,) if prompt else (), (1.0,) if prompt else (), loras)
    op, items, groups, end = call
    if text[end:].strip():
        raise SdtuneError(f"text after compel's .{op}(...) is not part of the prompt ({text[end:].strip()[:40]!r}); "
                          f"move it inside one of the quoted prompts")
    weights, normalize = _call_weights(op, groups)
    if weights and len(weights) != len(items):
        raise SdtuneError(f"compel .{op}() has {len(items)} prompts but {len(weights)} weights; give one weight "
                          f"per prompt or none")
    weights = weights or [1.0] * len(items)
    prompts = [fuse(flatten(item, 1.0)) for item in items]
    if op == "blend":
        if any(isinstance(x, CSwap) for p in prompts for x in p):
            raise SdtuneError("compel cannot .swap() inside a .blend(); blend whole prompts instead")
        return CConjunction((CBlend(tuple(prompts), tuple(weights), normalize),), (1.0,), loras)
    kept = [(p, w) for p, w in zip(prompts, weights) if p]  # compel drops parts that are empty
    return CConjunction(tuple(p for p, _ in kept), tuple(w for _, w in kept), loras)
