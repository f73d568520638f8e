"""`WeightedPromptEncoder`: the Generator's default prompt encoder (see `sdtune.generate.conditioning`).

It parses the prompt (A1111 or compel syntax), encodes every distinct scheduled text once, pads all encodings to the
same number of 77-token chunks (with empty-prompt chunks) and returns `PromptEmbeds`. When the prompt uses prompt
editing or AND, it also returns a `GuidanceSchedule` that the Generator applies step by step.
"""

from __future__ import annotations

import logging
from typing import Any

from sdtune.prompts.emphasis import resolve_emphasis
from sdtune.prompts.encoder import Encoded, TextConditioner
from sdtune.prompts.parse import ParsedPrompt, parse_prompt

log = logging.getLogger(__name__)


def _device(pipe: Any, model: Any) -> Any:
    """Where the pipeline runs: the text encoder's device, unless accelerate offloading moves modules around
    (then diffusers' `_execution_device`, which walks every module and costs milliseconds)."""
    if hasattr(model, "_hf_hook") or getattr(pipe, "_offload_gpu_id", None) is not None:
        return pipe._execution_device
    return next(model.parameters()).device


def _repeat(t: Any, n: int) -> Any:
    return t.repeat(n, *([1] * (t.ndim - 1)))


class WeightedPromptEncoder:
    """A `PromptEncoder` with A1111/compel weights, long prompts, prompt editing, AND and embeddings by name.

    embeddings: an `EmbeddingRegistry` (or None). comma_backtrack: A1111's chunk-at-comma window (0 = off).
    After a call, `last` holds the parsed (prompt, negative prompt), e.g. for their extra-network tags."""

    def __init__(self, embeddings: Any = None, *, comma_backtrack: int = 20) -> None:
        self.embeddings = embeddings
        self.comma_backtrack = comma_backtrack
        self.last: tuple[ParsedPrompt, ParsedPrompt] | None = None

    def __call__(self, pipe: Any, prompt: str, negative_prompt: str, *, num_images: int, do_cfg: bool,
                 clip_skip: int, steps: int = 20, prompt_syntax: str = "auto", emphasis: str = "auto") -> Any:
        import torch

        from sdtune.generate.conditioning import PromptEmbeds
        from sdtune.generate.guidance import GuidanceSchedule, ScheduledCond

        pos = parse_prompt(prompt, syntax=prompt_syntax, steps=steps)
        neg = parse_prompt(negative_prompt, syntax=prompt_syntax, steps=steps, negative=True)
        self.last = (pos, neg)
        networks = [n for n in pos.networks + neg.networks
                    if n.kind not in ("lora", "lyco", "hypernet")]  # applied by the Generator's extra networks
        if networks:
            tags = ", ".join(f"<{n.kind}:{n.name}:{n.weight:g}>" for n in networks)
            log.warning("extra-network tags %s were taken out of the prompt but are not applied (no extra network "
                        "of that kind is known; sdtune applies lora, lyco and hypernet tags)", tags)
        enc = TextConditioner(pipe, clip_skip=clip_skip, embeddings=self.embeddings,
                              comma_backtrack=self.comma_backtrack)
        cache: dict[tuple, Encoded] = {}

        def encode(cond: Any, parsed: ParsedPrompt) -> Encoded:
            mode = resolve_emphasis(emphasis, parsed.syntax)
            key = (cond, mode)
            if key not in cache:
                cache[key] = enc.encode(cond, mode)
            return cache[key]

        guided = not pos.is_simple or len(neg.parts[0].schedule) > 1
        need_uncond = do_cfg or guided
        part_encs = [[encode(e.cond, pos) for e in part.schedule] for part in pos.parts]
        zero_uncond = (not negative_prompt and need_uncond and bool(getattr(pipe.config, "force_zeros_for_empty_prompt",
                                                                            False)))
        neg_encs = [encode(e.cond, neg) for e in neg.parts[0].schedule] if need_uncond and not zero_uncond else []
        chunks = max(e.chunks for e in [x for p in part_encs for x in p] + neg_encs)
        part_encs = [[enc.pad(e, chunks) for e in p] for p in part_encs]
        neg_encs = [enc.pad(e, chunks) for e in neg_encs]
        if zero_uncond:
            neg_encs = [enc.zeros_like(part_encs[0][0])]

        dtype = enc.slots[-1].model.dtype
        device = _device(pipe, enc.slots[-1].model)

        def batch(e: Encoded) -> tuple[Any, Any]:
            hidden = _repeat(e.hidden.reshape(1, -1, e.hidden.shape[-1]).to(device=device, dtype=dtype), num_images)
            pooled = None if e.pooled is None else _repeat(e.pooled.reshape(1, -1).to(device=device, dtype=dtype),
                                                           num_images)
            return hidden, pooled

        cond, cond_pooled = batch(part_encs[0][0])
        uncond, uncond_pooled = batch(neg_encs[0]) if need_uncond else (None, None)
        schedule = None
        if guided:
            def scheduled(encs: list[Encoded], ends: list[int], weight: float) -> ScheduledCond:
                pairs = [batch(e) for e in encs]
                pooled = [p for _, p in pairs] if pairs[0][1] is not None else []
                return ScheduledCond(ends, [h for h, _ in pairs], pooled, weight)

            neg_ends = [e.end_step for e in neg.parts[0].schedule] if not zero_uncond else [steps]
            schedule = GuidanceSchedule(
                scheduled(neg_encs, neg_ends, 1.0),
                [scheduled(encs, [e.end_step for e in part.schedule], part.weight)
                 for encs, part in zip(part_encs, pos.parts)])
        if cond_pooled is not None and uncond is not None and uncond_pooled is None:
            uncond_pooled = torch.zeros_like(cond_pooled)
        return PromptEmbeds(cond, uncond if do_cfg else None, cond_pooled, uncond_pooled if do_cfg else None,
                            guidance=schedule)
