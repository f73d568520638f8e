"""The identifier of a personalisation run ("sks" in "a red sks shape") and the captions without it.

Why: prior preservation keeps the base model where the captions do not use the new concept, but it needs a class
prompt, and users who train with defaults name none. The captions already say what the class is: every caption
without its identifier ("a red sks shape on a blue background" -> "a red shape on a blue background") is a prompt
the base model should answer as before. So a default run can preserve the prior with no extra option once it knows
the identifier: given with `--identifier`, or detected here.

Detection is conservative (a wrong guess would regularise the concept away): a word present in every caption that
is either a well-known identifier convention (sks, ohwx, ...), written as a new token (`<name>`), or the one
common word the model's tokenizer does not know as a single token. No such word, or several: None, and the caller
says so and what to pass. A word that merely looks rare is not enough: the class noun ("dog", "shape") is in every
caption too, and tokenizers (e.g. the bundled tiny model's, ordered alphabetically) do not all rank words by
frequency.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    from sdtune.training.context import TrainingContext

# identifiers the DreamBooth / kohya guides use; a caption word equal to one of these is taken as the identifier
CONVENTIONAL = ("sks", "ohwx", "zwx", "zxc", "xjy", "pll")
_WORD = re.compile(r"[^\s,.;:!?()\[\]{}\"]+")
_EDGE_BEFORE = r"(?<![^\s,.;:!?()\[\]{}\"])"  # a word starts here (as `caption_words` splits)
# words that follow an identifier without being its class ("sks in a garden", "sks wearing a hat")
FUNCTION_WORDS = frozenset("a an the in on at of with and or but is are was were be been being has have had by for "
                           "from to as near under over into onto inside outside behind beside next against during "
                           "without through wearing holding sitting standing lying looking posing smiling while that "
                           "which who whose his her its their my your our this these those".split())


def caption_words(caption: str) -> list[str]:
    """Lower-cased words of a caption (split on spaces and punctuation; `<token>` stays one word)."""
    return [w.lower() for w in _WORD.findall(caption)]


def common_words(captions: Iterable[str]) -> list[str]:
    """Words present in every non-empty caption, in the order of the first one."""
    caps = [c for c in captions if c.strip()]
    if not caps:
        return []
    first = list(dict.fromkeys(caption_words(caps[0])))
    rest = [set(caption_words(c)) for c in caps[1:]]
    return [w for w in first if all(w in r for r in rest)]


def _tokens(tokenizer: Any, word: str) -> int:
    try:
        return len(tokenizer(word, add_special_tokens=False).input_ids)
    except Exception:  # a tokenizer without this call: no opinion
        return 1


def detect_identifier(captions: Iterable[str], tokenizer: Any = None) -> str | None:
    """The identifier word of `captions`, or None when there is no clear one (module docstring)."""
    common = common_words(captions)
    for word in common:
        if word in CONVENTIONAL or (word.startswith("<") and word.endswith(">") and len(word) > 2):
            return word
    if tokenizer is not None and len(common) > 1:
        unknown = [w for w in common if w.isalpha() and _tokens(tokenizer, w) > 1]
        if len(unknown) == 1:
            return unknown[0]
    return None


def without_identifier(caption: str, identifier: str) -> str:
    """The caption with every occurrence of the identifier word removed, spaces and commas tidied."""
    pattern = re.compile(_EDGE_BEFORE + re.escape(identifier) + r"(?![^\s,.;:!?()\[\]{}\"])", re.IGNORECASE)
    text = pattern.sub(" ", caption)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;])\s*(?=[,;])", "", text)
    return text.strip(" ,;")


def class_prompts(captions: Iterable[str], identifier: str) -> list[str]:
    """The distinct non-empty identifier-free captions, sorted (deterministic class-image prompts)."""
    return sorted({p for p in (without_identifier(c, identifier) for c in captions) if p})


def class_noun(captions: Iterable[str], identifier: str) -> str | None:
    """The word that follows the identifier in most of the captions that use it ("shape" in "a red sks shape", "dog"
    in "a photo of sks dog"): the class the concept belongs to. None when no plain word follows it in more than half
    of them (tags such as "sks, 1girl, ...") or what follows is a function word ("sks in a garden", "sks is ...")."""
    pattern = re.compile(_EDGE_BEFORE + re.escape(identifier) + r"\s+([A-Za-z]+)\b", re.IGNORECASE)
    using = [c for c in captions if identifier in caption_words(c)]
    found = (m.group(1).lower() for m in (pattern.search(c) for c in using) if m)
    follows = Counter(w for w in found if w not in FUNCTION_WORDS)
    if not follows:
        return None
    word, n = follows.most_common(1)[0]
    return word if 2 * n > len(using) else None


def read_captions(ctx: TrainingContext) -> list[str]:
    """The training captions as the run will use them (after --prompt); changes nothing."""
    captions: list[str] = []

    def keep(item: Any) -> str:
        captions.append(item.caption)
        return str(item.caption)

    ctx.map_captions(keep)
    return captions


def auto_class_prompts(ctx: TrainingContext, options: Any, tokenizer: Any) -> tuple[str | None, list[str]]:
    """(identifier, class prompts) for automatic prior preservation: the training captions without the identifier
    (None, []) when there is none. An --identifier in no caption is an error."""
    captions = read_captions(ctx)
    ident = (options.identifier or "").strip().lower() or detect_identifier(captions, tokenizer)
    if ident is None:
        return None, []
    using = [c for c in captions if ident in caption_words(c)]
    if options.identifier and not using:
        raise SdtuneError(f"--identifier {options.identifier!r} is in none of the {len(captions)} captions; pass "
                          "the word your captions use for the concept (e.g. the sks of 'a photo of sks dog')")
    return ident, class_prompts(using, ident)
