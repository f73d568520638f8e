"""The prompt language: A1111 and compel weighting, prompt editing, AND, BREAK, extra-network tags, embeddings by
name, prompts of any length, and how the weights reach the text encoder. See docs/prompts.md."""

from sdtune.prompts.attention import attention_fragments, parse_attention
from sdtune.prompts.compel import parse_compel, parse_compel_weights
from sdtune.prompts.composable import split_and
from sdtune.prompts.embeddings import EmbeddingRegistry
from sdtune.prompts.emphasis import EMPHASES
from sdtune.prompts.encoder import Encoded, TextConditioner
from sdtune.prompts.explain import explain_prompt
from sdtune.prompts.extra_networks import ExtraNetwork, extract_extra_networks
from sdtune.prompts.fragments import BREAK, Blend, Fragment, plain_text
from sdtune.prompts.parse import ParsedPrompt, PromptPart, ScheduleEntry, parse_prompt
from sdtune.prompts.schedule import entry_for_step, prompt_schedule
from sdtune.prompts.syntax import SYNTAXES, detect_syntax, resolve_syntax
from sdtune.prompts.tokens import PromptToken, chunk_ids, chunk_tokens
from sdtune.prompts.weighted import WeightedPromptEncoder

__all__ = [
    "BREAK", "EMPHASES", "SYNTAXES", "Blend", "EmbeddingRegistry", "Encoded", "ExtraNetwork", "Fragment",
    "ParsedPrompt", "PromptPart", "PromptToken", "ScheduleEntry", "TextConditioner", "WeightedPromptEncoder",
    "attention_fragments", "chunk_ids", "chunk_tokens", "detect_syntax", "entry_for_step", "explain_prompt",
    "extract_extra_networks", "parse_attention", "parse_compel", "parse_compel_weights", "parse_prompt",
    "plain_text", "prompt_schedule", "resolve_syntax", "split_and",
]
