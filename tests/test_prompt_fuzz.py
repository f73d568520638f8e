"""Property test: every prompt parser, on any text, either parses it or raises `SdtuneError` (one line), never
another exception. Prompts are generated from the syntax's own pieces (brackets, colons, numbers, backslashes,
BREAK, AND, prompt editing and alternation, compel weights and calls, extra-network tags, surrogates, long runs),
so the generator reaches the parsers' corners rather than only plain words.

CI runs a bounded profile (SDTUNE_FUZZ_EXAMPLES, default 600 per parser). Soak run (docs/prompts.md, "Fuzzing the
parsers"): `SDTUNE_FUZZ_EXAMPLES=100000 python -m pytest tests/test_prompt_fuzz.py`."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdtune.errors import SdtuneError

EXAMPLES = int(os.environ.get("SDTUNE_FUZZ_EXAMPLES", "600"))
settings.register_profile("sdtune-fuzz", max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 600,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PIECES = [
    "(", ")", "[", "]", "{", "}", "<", ">", ":", "|", ",", " ", "\\", "\\(", "\\)", "\\[", "\\]", "\\\\", "\n", "\t",
    "BREAK", " BREAK ", "AND", " AND ", " AND :", " :0.5", ":1.2", ":-1", ":1e308", ":1e309", ":nan", ":inf", ":-inf",
    "0", "0.5", "1.2", "-0.5", "3", "99999999999999999999", "1e-400", ".", "..", "+", "-", "++", "--", "+-",
    "(x)1.2", "(x)-0.3", "(x)1e9", "(x)nan", "x+++", "x---", "x" + "+" * 40, "[a:b:0.5]", "[a:b:5]", "[a:b:-1]",
    "[a:b:1e9]", "[a::0.3]", "[:b:0.3]", "[a:0.3]", "[a|b]", "[a|b|]", "[|]", "[[a:b:0.2]:c:0.8]",
    "(a:1.2)", "(a:)", "(:1)", "((a))", "[[a]]", "(a:1.2:3)", "\"", "\"a\"", "'", "'a'",
    '("a", "b").blend(0.7, 0.3)', '("a", "b").blend(1)', '("a").blend()', ".blend(", ".blend()", '("a", "b").and()',
    '("a").and(1, 2)', ".and(", ".and()", ").swap(", '"a".swap("b")', ".attend(", "withLora(x, 0.5)", "withLora(",
    "useLora(x,", "withLora(x, nan)", "<lora:x:0.5>", "<lora:x>", "<lora::>", "<lora:x:nan>", "<lora:x:1:2>",
    "<hypernet:h:1>", "<lyco:y:0.3>", "<:>", "<lora:", "cat", "a red circle", "é", "日本", "\U0001f600", "\u0301",
    "\ud800", "\udcff", "\x00", "\u200b", "\ufeff", "%", "{a|b}", "$$", "__x__",
]


NESTINGS = [("(", ")"), ("[", "]"), ("(", ":1.1)"), ("[a:", ":0.5]"), ("[a|", "]"), ("(", ")+"), ("(", ")1.1"),
            ('("', '").blend(1)'), ('("a", ', ").and()"), ("withLora(", ", 1)"), ("<lora:", ">"), ("{", "}")]


@st.composite
def prompts(draw: Any) -> str:
    """A prompt made of syntax pieces, free text and occasionally a long run of one piece."""
    parts = draw(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=30))
    if draw(st.integers(0, 9)) == 0:
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(PIECES)) * draw(st.integers(50, 400)))
    text = "".join(parts)
    if draw(st.integers(0, 9)) == 0:  # deep nesting: recursion limits, quadratic rescans
        opener, closer = draw(st.sampled_from(NESTINGS))
        depth = draw(st.integers(10, 3000))
        text = opener * depth + text + closer * depth
    return text


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from sdtune.models.tokenizer import tokenizer_for

    return tokenizer_for("tiny")


def _explain(text: str) -> Any:
    from sdtune.prompts import explain_prompt

    return explain_prompt(text, negative=text[::-1], tokenizer=_tokenizer(), steps=7)


def _parse(syntax: str) -> Callable[[str], Any]:
    def run(text: str) -> Any:
        from sdtune.prompts import parse_prompt

        parsed = parse_prompt(text, syntax=syntax, steps=13)
        parse_prompt(text, syntax=syntax, steps=1, negative=True)
        return parsed

    return run


def _schedule(text: str) -> Any:
    from sdtune.prompts import entry_for_step, prompt_schedule

    entries = prompt_schedule(text, 10)
    ends = [end for end, _ in entries]
    return [entry_for_step(ends, step) for step in range(12)]


def _compel_structure(text: str) -> Any:
    from sdtune.prompts.compel import compel_structure

    return compel_structure(text)


def _chunks(text: str) -> Any:
    from sdtune.prompts import attention_fragments, chunk_tokens

    return chunk_tokens(attention_fragments(text), _tokenizer())


def _extra(text: str) -> Any:
    from sdtune.prompts.extra_networks import extract_compel_loras, extract_extra_networks

    return extract_extra_networks(text), extract_compel_loras(text)


def _syntax(text: str) -> Any:
    from sdtune.prompts import detect_syntax, resolve_syntax

    return detect_syntax(text), resolve_syntax(text), resolve_syntax(text, "compel")


def _break(text: str) -> Any:
    from sdtune.prompts.attention import split_break

    return split_break(text)


def _parsers() -> dict[str, Callable[[str], Any]]:
    from sdtune.prompts import (attention_fragments, parse_attention, parse_compel, parse_compel_weights,
                                split_and)

    return {
        "parse_attention": parse_attention, "attention_fragments": attention_fragments, "split_break": _break,
        "split_and": split_and, "prompt_schedule": _schedule, "parse_compel": parse_compel,
        "parse_compel_weights": parse_compel_weights, "compel_structure": _compel_structure,
        "extra_networks": _extra, "syntax": _syntax, "parse_prompt_auto": _parse("auto"),
        "parse_prompt_a1111": _parse("a1111"), "parse_prompt_compel": _parse("compel"), "chunk_tokens": _chunks,
        "explain_prompt": _explain,
    }


PARSERS = sorted(_parsers())


@pytest.mark.parametrize("name", PARSERS)
def test_parser_raises_only_sdtune_error(name: str) -> None:
    parser = _parsers()[name]

    @settings(settings.get_profile("sdtune-fuzz"))
    @given(prompts())
    def check(text: str) -> None:
        try:
            parser(text)
        except SdtuneError as exc:
            assert "\n" not in str(exc), str(exc)

    check()
