"""A whole prompt, parsed: extra-network tags, AND parts, each part's prompt-editing schedule, and the weighted
fragments of every scheduled text. The order is A1111's: tags out, split at AND, schedule, then weights."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sdtune.prompts.attention import attention_fragments
from sdtune.prompts.compel import parse_compel
from sdtune.prompts.composable import split_and
from sdtune.prompts.extra_networks import ExtraNetwork, extract_extra_networks
from sdtune.prompts.fragments import Conditioning
from sdtune.prompts.schedule import entry_for_step, prompt_schedule
from sdtune.prompts.syntax import resolve_syntax


@dataclass(frozen=True)
class ScheduleEntry:
    end_step: int  # last sampling step this text is used for (A1111's numbering, see schedule.py)
    text: str
    cond: Conditioning


@dataclass(frozen=True)
class PromptPart:
    """One AND sub-prompt: its guidance weight and its schedule (one entry when there is no prompt editing)."""

    weight: float
    text: str
    schedule: tuple[ScheduleEntry, ...]

    def at_step(self, step: int) -> ScheduleEntry:
        return self.schedule[entry_for_step([e.end_step for e in self.schedule], step)]


@dataclass(frozen=True)
class ParsedPrompt:
    text: str
    syntax: str
    steps: int
    networks: tuple[ExtraNetwork, ...]
    parts: tuple[PromptPart, ...]

    @property
    def is_simple(self) -> bool:
        """One part of weight 1 without prompt editing: plain CFG, no per-step conditioning needed."""
        return len(self.parts) == 1 and self.parts[0].weight == 1.0 and len(self.parts[0].schedule) == 1


@lru_cache(maxsize=512)
def conditioning(text: str, syntax: str) -> Conditioning:
    """The weighted form of one scheduled text (syntax already resolved: 'a1111' or 'compel')."""
    return parse_compel(text) if syntax == "compel" else attention_fragments(text)


def parse_prompt(text: str, *, syntax: str = "auto", steps: int = 20, negative: bool = False) -> ParsedPrompt:
    """Parse a prompt for `steps` sampling steps. `negative` prompts are not split at AND (as in A1111).

    compel prompts have no AND or prompt editing (compel has `.and()` / `.blend()` instead)."""
    steps = max(1, int(steps))
    body, networks = extract_extra_networks(text)
    syntax = resolve_syntax(body, syntax)
    parts: tuple[PromptPart, ...]
    if syntax == "compel":
        entry = ScheduleEntry(steps, body, conditioning(body, syntax))
        parts = (PromptPart(1.0, body, (entry,)),)
    else:
        pieces = [(body, 1.0)] if negative else split_and(body)
        parts = tuple(
            PromptPart(weight, piece, tuple(ScheduleEntry(end, t, conditioning(t, syntax))
                                            for end, t in prompt_schedule(piece, steps)))
            for piece, weight in pieces)
    return ParsedPrompt(text, syntax, steps, tuple(networks), parts)
