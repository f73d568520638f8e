"""compel / InvokeAI weighting syntax.

Supported (weights multiply when nested):

- `word+`, `word++`, `word-`, `word--`: the word before the signs gets 1.1**n (`+`) or 0.9**n (`-`). Signs count
  only at the end of a word (followed by a space, punctuation or the end), so `close-up` and `C4-x` are plain.
- `(a phrase)1.3`, `(a phrase)+++`, `(a phrase)-`: a group with a weight; `(a phrase)` alone has weight 1 (unlike
  A1111, where it is 1.1).
- `"a phrase"1.3`, `"a phrase"+`: a quoted group, the same as the round one.
- `("a red cat", "a blue dog").blend(0.7, 0.3)`: each prompt is encoded on its own and the encodings are added with
  the weights divided by their sum. Missing weights are 1; if the sum is (nearly) zero, the weights are divided by
  the sum of their absolute values instead (all zero: equal weights), so a blend never divides by zero.
- `("a red cat", "a blue dog").and()`: the prompts are encoded on their own and joined along the token axis (as if
  separated by BREAK); `.and(w1, w2)` also weights each prompt as a whole.
- `\\(`, `\\)`, `\\"`, `\\\\` are literal characters; any other backslash is kept as text.

Not supported: `.swap()` (cross-attention control) and compel's `withLora` style calls; they stay as text.
Unbalanced brackets never raise: a `(` or `"` that is not closed groups to the end with weight 1; a `)` with nothing
open is text.
"""

from __future__ import annotations

import re

from sdtune.prompts.fragments import BREAK, Blend, Conditioning, Fragment, clean_weight, merge

UP, DOWN = 1.1, 0.9
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SUFFIX = re.compile(rf"\++|-+|{_NUMBER}")
_PLAIN = re.compile(r"""[^()"\\]+""")
_TOKEN = re.compile(r"\S+")
_CALL = re.compile(r"^\s*\((?P<args>.*)\)\s*\.(?P<op>blend|and)\(\s*(?P<weights>[^()]*)\)\s*$", re.S)
_QUOTED = re.compile(r"""\s*(?P<q>["'])(?P<body>(?:\\.|(?!(?P=q)).)*)(?P=q)\s*(?:,|$)""", re.S)
_WEIGHT_ARG = re.compile(rf"\s*([+-]?{_NUMBER})\s*(?:,|$)")


_INNER_END = set(",.;:!?")


def _signed_words(token: str, ends_ok: bool) -> list[tuple[int, int, int]]:
    """(word start, signs start, signs end) of each `word+` / `word--` in a whitespace-free token, leftmost first.

    Signs count when followed by `,.;:!?`, or by the token's end if `ends_ok` (a space, `)`, `"` or the end of
    the prompt follows). A word starts with a character other than a sign. Linear in the token's length."""
    found, start, n = [], 0, len(token)
    while start < n:
        while start < n and token[start] in "+-":
            start += 1
        k = start + 1
        match = None
        while k < n:
            if token[k] in "+-":
                r = k
                while r < n and token[r] == token[k]:
                    r += 1
                if (r == n and ends_ok) or (r < n and token[r] in _INNER_END):
                    match = (start, k, r)
                    break
                k = r
            else:
                k += 1
        if match is None:
            break
        found.append(match)
        start = match[2]
    return found


def _suffix_weight(suffix: str) -> float:
    if suffix.startswith("+"):
        return UP ** len(suffix)
    if suffix.startswith("-"):
        return DOWN ** len(suffix)
    return float(suffix)


def parse_compel_weights(text: str) -> list[list]:
    """Weighted text in compel syntax as `[text, weight]` pairs (neighbours of equal weight merged; raw weights)."""
    out: list[list] = []
    groups: list[tuple[str, int]] = []  # (opening char, index into out)

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    def close(start: int, at: int) -> int:
        m = _SUFFIX.match(text, at)
        if m and not (m.group(0)[0] in "+-" and at + len(m.group(0)) < len(text)
                      and text[at + len(m.group(0))].isalnum()):
            scale(start, _suffix_weight(m.group(0)))
            return m.end()
        return at

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in '()"\\':
                out.append([text[i + 1], 1.0])
                i += 2
            else:
                out.append(["\\", 1.0])
                i += 1
        elif c == "(":
            groups.append(("(", len(out)))
            i += 1
        elif c == '"':
            if groups and groups[-1][0] == '"':
                i = close(groups.pop()[1], i + 1)
            else:
                groups.append(('"', len(out)))
                i += 1
        elif c == ")":
            if groups and groups[-1][0] == "(":
                i = close(groups.pop()[1], i + 1)
            else:
                out.append([")", 1.0])
                i += 1
        else:
            m = _PLAIN.match(text, i)
            assert m is not None  # text[i] is none of ()"\ (the branches above)
            chunk, i = m.group(0), m.end()
            ends_ok = i == n or text[i] in ')"'
            pos = 0
            for t in _TOKEN.finditer(chunk):
                for a, b, e in _signed_words(t.group(0), t.end() < len(chunk) or ends_ok):
                    a, b, e = a + t.start(), b + t.start(), e + t.start()
                    if a > pos:
                        out.append([chunk[pos:a], 1.0])
                    out.append([chunk[a:b], _suffix_weight(chunk[b:e])])
                    pos = e
            if pos < len(chunk):
                out.append([chunk[pos:], 1.0])
    merged: list[list] = []
    for item in out:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged or [["", 1.0]]


def _fragments(text: str, factor: float = 1.0) -> tuple[Fragment, ...]:
    return merge([Fragment(t, clean_weight(w * factor)) for t, w in parse_compel_weights(text)])


def _call(text: str) -> tuple[str, list[str], list[float]] | None:
    """`("a", "b").blend(...)` / `.and(...)` -> (op, prompts, weights), or None if the text is not such a call."""
    m = _CALL.match(text)
    if not m:
        return None
    args, prompts, pos = m.group("args"), [], 0
    while pos < len(args):
        q = _QUOTED.match(args, pos)
        if not q or q.end() == pos:
            return None
        prompts.append(re.sub(r"\\(.)", r"\1", q.group("body")))
        pos = q.end()
    weights, raw, pos = [], m.group("weights"), 0
    while pos < len(raw):
        w = _WEIGHT_ARG.match(raw, pos)
        if not w or w.end() == pos:
            return None
        weights.append(float(w.group(1)))
        pos = w.end()
    if not prompts:
        return None
    return m.group("op"), prompts, weights


def blend_weights(weights: list[float], count: int) -> list[float]:
    """Blend weights for `count` prompts: missing ones are 1, then divided by their sum (or, when that is nearly
    zero, by the sum of absolute values; all zero: equal). Always finite."""
    ws = [w if w == w and abs(w) < 1e30 else 1.0 for w in (weights + [1.0] * count)[:count]]
    total = sum(ws)
    if abs(total) < 1e-6:
        total = sum(abs(w) for w in ws)
    if total < 1e-12:
        return [1.0 / count] * count
    return [w / total for w in ws]


def parse_compel(text: str) -> Conditioning:
    """A compel prompt as encoder input: a tuple of Fragments, or a Blend."""
    call = _call(text)
    if call is None:
        return _fragments(text)
    op, prompts, weights = call
    if op == "blend":
        return Blend(tuple((_fragments(p), w) for p, w in zip(prompts, blend_weights(weights, len(prompts)))))
    frags: list[Fragment] = []
    for k, p in enumerate(prompts):
        if k:
            frags.append(BREAK)
        frags.extend(_fragments(p, weights[k] if k < len(weights) else 1.0))
    return merge(frags)
