"""`explain_prompt`: what sdtune will do with a prompt, as text (used by `sdtune prompt explain`).

It shows the syntax and emphasis mode, extra-network tags, embeddings found by name, the AND parts with their
weights, each part's schedule (which sampling steps use which text) and, for every scheduled text, its chunks with
the weight of every token."""

from __future__ import annotations

from typing import Any

from sdtune.prompts.emphasis import resolve_emphasis
from sdtune.prompts.fragments import Blend, Fragment
from sdtune.prompts.parse import ParsedPrompt, PromptPart, parse_prompt
from sdtune.prompts.tokens import chunk_tokens


def _token_text(tokenizer: Any, token: Any) -> str:
    if token.embedding is not None:
        return f"<{token.embedding}#{token.vector}>"
    text = tokenizer.convert_ids_to_tokens(token.id)
    return text[:-4] if text.endswith("</w>") else text + "…"


def _fmt_weight(w: float) -> str:
    return f"{w:.4g}"


def _chunks_lines(frags: tuple[Fragment, ...], tokenizer: Any, embeddings: Any, comma_backtrack: int,
                  indent: str) -> list[str]:
    chunks = chunk_tokens(frags, tokenizer, embeddings, comma_backtrack=comma_backtrack)
    lines, first = [], 1
    for n, chunk in enumerate(chunks, 1):
        last = first + len(chunk) - 1
        span = f"tokens {first}-{last}" if chunk else "empty"
        lines.append(f"{indent}chunk {n}/{len(chunks)} ({span}; BOS + 75 + EOS = 77 positions):")
        words = [f"{_token_text(tokenizer, t)}" + ("" if t.weight == 1.0 else f"({_fmt_weight(t.weight)})")
                 for t in chunk]
        line = indent + "  "
        for w in words:
            if len(line) + len(w) > 110 and line.strip():
                lines.append(line.rstrip())
                line = indent + "  "
            line += w + " "
        if line.strip():
            lines.append(line.rstrip())
        first = last + 1
    return lines


def _step_ranges(part: PromptPart, steps: int) -> list[tuple[int, int]]:
    """0-based sampling steps each schedule entry is used for (A1111: step i uses the first entry whose end >= i);
    lo > hi means the entry is never used."""
    out, lo = [], 0
    for entry in part.schedule:
        hi = min(entry.end_step, steps - 1)
        out.append((lo, hi))
        lo = max(lo, hi + 1)
    return out


def _describe(parsed: ParsedPrompt, label: str, tokenizer: Any, embeddings: Any, emphasis: str,
              comma_backtrack: int) -> list[str]:
    mode = resolve_emphasis(emphasis, parsed.syntax)
    lines = [f"{label}: {parsed.text!r}", f"  syntax: {parsed.syntax}   emphasis: {mode}   steps: {parsed.steps}"]
    if parsed.networks:
        for net in parsed.networks:
            note = "" if net.known else "  (unknown kind: ignored)"
            lines.append(f"  extra network: {net.kind} {net.name!r} weight {_fmt_weight(net.weight)}{note}")
    if embeddings is not None and len(embeddings):
        found = sorted({name for part in parsed.parts for e in part.schedule
                        for name in _names(e.cond, embeddings)})
        for name in found:
            lines.append(f"  embedding: {name!r} -> {embeddings.num_vectors(name)} vector(s)")
    if len(parsed.parts) > 1 or parsed.parts[0].weight != 1.0:
        lines.append(f"  AND parts: {len(parsed.parts)}; noise = uncond + cfg * sum_i w_i * (cond_i - uncond)")
    for p, part in enumerate(parsed.parts, 1):
        ind = "  "
        if len(parsed.parts) > 1 or part.weight != 1.0:
            lines.append(f"  part {p} (weight {_fmt_weight(part.weight)}): {part.text!r}")
            ind = "    "
        for entry, (lo, hi) in zip(part.schedule, _step_ranges(part, parsed.steps)):
            sub = ind
            if len(part.schedule) > 1:
                when = "never used" if lo > hi else f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
                lines.append(f"{ind}{when} (0-based): {entry.text!r}")
                sub = ind + "  "
            if isinstance(entry.cond, Blend):
                for q, (frags, w) in enumerate(entry.cond.parts, 1):
                    lines.append(f"{sub}blend part {q} (weight {_fmt_weight(w)}):")
                    lines += _chunks_lines(frags, tokenizer, embeddings, comma_backtrack, sub + "  ")
            else:
                lines += _chunks_lines(entry.cond, tokenizer, embeddings, comma_backtrack, sub)
    return lines


def _names(cond: Any, embeddings: Any) -> set[str]:
    frag_lists = [f for f, _ in cond.parts] if isinstance(cond, Blend) else [cond]
    return {piece for frags in frag_lists for f in frags for i, piece in enumerate(embeddings.split(f.text)) if i % 2}


def explain_prompt(text: str, *, negative: str = "", tokenizer: Any = None, syntax: str = "auto", steps: int = 20,
                   emphasis: str = "auto", embeddings: Any = None, comma_backtrack: int = 20) -> str:
    """A multi-line explanation of `text` (and `negative`, if given). tokenizer defaults to SD's CLIP tokenizer."""
    from sdtune.prompts.tokens import check_text

    check_text(text)
    check_text(negative, "the negative prompt")
    if tokenizer is None:
        from sdtune.models.tokenizer import clip_tokenizer

        tokenizer = clip_tokenizer()
    lines = _describe(parse_prompt(text, syntax=syntax, steps=steps), "prompt", tokenizer, embeddings, emphasis,
                      comma_backtrack)
    if negative:
        lines += _describe(parse_prompt(negative, syntax=syntax, steps=steps, negative=True), "negative prompt",
                           tokenizer, embeddings, emphasis, comma_backtrack)
    return "\n".join(lines)
