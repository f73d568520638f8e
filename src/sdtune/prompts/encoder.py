"""`TextConditioner`: weighted fragments -> text-encoder hidden states (and SDXL's pooled vector) for a pipeline.

Conventions follow diffusers' `encode_prompt`, so an unweighted prompt of up to 75 tokens gives bit-identical
embeddings:

- SD1/SD2 (one encoder): clip_skip 1 (A1111's numbering) is the last hidden state (final layer norm applied);
  clip_skip n > 1 is hidden state -n with the final layer norm applied, as A1111 does. (SD2's diffusers encoder
  already ends at the original model's penultimate layer.)
- SDXL: each encoder's hidden state -(clip_skip + 1) (the penultimate layer for clip_skip 1, no final norm),
  concatenated along features; the pooled vector is the second encoder's projected output for the first chunk of
  the prompt (its text without syntax; weights do not touch it). A refiner has only the second encoder.
- clip_skip applies to the negative prompt too (A1111; diffusers applies it to the positive prompt only).

Long prompts are several 77-token chunks encoded as a batch and concatenated along the sequence.
Embeddings from an `EmbeddingRegistry` replace the token-embedding rows of their placeholder positions through a
forward hook that exists only during the call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from sdtune.errors import SdtuneError
from sdtune.prompts import emphasis as emph
from sdtune.prompts.fragments import Blend, Conditioning, Fragment
from sdtune.prompts.tokens import CHUNK, chunk_ids, chunk_tokens


@dataclass
class EncoderSlot:
    tokenizer: Any
    model: Any
    key: str             # embedding registry key: clip_l / clip_h / clip_g
    sdxl: bool           # SDXL hidden-state convention
    pooled: bool         # this encoder gives SDXL's pooled vector

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)


def encoder_slots(pipe: Any) -> list[EncoderSlot]:
    te2 = getattr(pipe, "text_encoder_2", None)
    if te2 is not None:
        slots = []
        if getattr(pipe, "text_encoder", None) is not None:
            slots.append(EncoderSlot(pipe.tokenizer, pipe.text_encoder, "clip_l", True, False))
        slots.append(EncoderSlot(pipe.tokenizer_2, te2, "clip_g", True, True))
        return slots
    te = pipe.text_encoder
    return [EncoderSlot(pipe.tokenizer, te, "clip_h" if te.config.hidden_size == 1024 else "clip_l", False, False)]


def _layer_count(model: Any) -> int:
    """Transformer layers of a text encoder (hidden states: this many + the embeddings)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) and n > 0 else 10**9  # unknown: no bound here


@dataclass
class Encoded:
    hidden: Any          # [chunks, 77, D] (D = all encoders' widths together)
    pooled: Any = None   # [Dp] for SDXL, else None

    @property
    def chunks(self) -> int:
        return int(self.hidden.shape[0])


@contextmanager
def _spliced(model: Any, rows: list[int], cols: list[int], vectors: Any) -> Iterator[None]:
    """Temporarily replace token-embedding outputs at (rows, cols) with `vectors`."""
    if not rows:
        yield
        return

    def hook(module: Any, args: Any, output: Any) -> Any:
        out = output.clone()
        out[rows, cols] = vectors.to(device=out.device, dtype=out.dtype)
        return out

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class TextConditioner:
    """Encodes `Conditioning`s (fragments or blends) for one pipeline with fixed clip skip and embeddings."""

    def __init__(self, pipe: Any, *, clip_skip: int = 1, embeddings: Any = None, comma_backtrack: int = 20) -> None:
        self.pipe = pipe
        self.slots = encoder_slots(pipe)
        self.clip_skip = max(1, int(clip_skip))
        layers = min(_layer_count(slot.model) for slot in self.slots)
        if self.clip_skip > layers:
            raise SdtuneError(f"clip skip {self.clip_skip} is more than this model's text encoder has layers "
                              f"({layers}); use 1..{layers} (1 = last layer, 2 = the layer before)")
        self.embeddings = embeddings
        self.comma_backtrack = comma_backtrack
        self._empty: dict[int, tuple[Any, Any]] = {}
        self.grad = False  # True: gradients flow into embedding vectors (Textual Inversion training)

    # -- one encoder --------------------------------------------------------------------------------------------

    def _run(self, slot: EncoderSlot, ids: list[list[int]], tokens: list[list[Any]], mask: Any = None) -> tuple:
        """Hidden states [N, 77, D] (and pooled [N, Dp] or None) for rows of ids; tokens locate embeddings."""
        import torch

        model = slot.model
        rows, cols, vecs = [], [], []
        for r, chunk in enumerate(tokens):
            for c, tok in enumerate(chunk):
                if tok.embedding is not None:
                    rows.append(r)
                    cols.append(c + 1)
                    vecs.append(self.embeddings.vectors(tok.embedding, slot.key, slot.width)[tok.vector])
        device = next(model.parameters()).device
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        want_hidden = slot.sdxl or self.clip_skip > 1
        with torch.set_grad_enabled(self.grad), _spliced(model, rows, cols, torch.stack(vecs) if vecs else None):
            out = model(input_ids, attention_mask=None if mask is None else mask.to(device),
                        output_hidden_states=want_hidden)
        if slot.sdxl:
            hidden = out.hidden_states[-(self.clip_skip + 1)]
        elif self.clip_skip > 1:
            norm = getattr(model, "text_model", model).final_layer_norm
            with torch.set_grad_enabled(self.grad):
                hidden = norm(out.hidden_states[-self.clip_skip])
        else:
            hidden = out[0]
        pooled = out[0] if slot.pooled else None
        return hidden, pooled

    def _empty_chunk(self, index: int) -> tuple[Any, Any]:
        """The empty prompt's chunk for slot `index`: ([77, D], pooled [Dp] or None)."""
        if index not in self._empty:
            slot = self.slots[index]
            ids, _ = chunk_ids([], slot.tokenizer)
            hidden, pooled = self._run(slot, [ids], [[]])
            self._empty[index] = (hidden[0], None if pooled is None else pooled[0])
        return self._empty[index]

    def _encode_slot(self, index: int, fragments: tuple[Fragment, ...], emphasis: str) -> tuple[Any, Any]:
        import torch

        slot = self.slots[index]
        chunks = chunk_tokens(fragments, slot.tokenizer, self.embeddings, comma_backtrack=self.comma_backtrack)
        rows = [chunk_ids(chunk, slot.tokenizer) for chunk in chunks]
        ids = [r[0] for r in rows]
        hidden, pooled = self._run(slot, ids, chunks)
        pooled = None if pooled is None else pooled[0]
        weights = torch.tensor([r[1] for r in rows], dtype=torch.float32, device=hidden.device)
        if emphasis == "ignore" or bool((weights == 1.0).all()):
            return hidden, pooled
        if emphasis == "none":
            return emph.multiply(hidden, weights), pooled
        if emphasis == "original":
            return emph.original(hidden, weights), pooled
        return self._compel(index, ids, chunks, hidden, weights), pooled

    def _compel(self, index: int, ids: list, chunks: list, hidden: Any, weights: Any) -> Any:
        """compel emphasis: up-weight away from the empty prompt; down-weight each fragment by blending with an
        encoding where that fragment is masked out of attention (and its own positions hold the empty prompt's
        encoding): z = w * z + (1 - w) * z_masked."""
        import torch

        empty, _ = self._empty_chunk(index)
        out = emph.compel_up(hidden, weights, empty).float()
        jobs = []  # (chunk, positions, weight)
        for c, chunk in enumerate(chunks):
            by_fragment: dict[int, list[int]] = {}
            for p, tok in enumerate(chunk):
                if tok.weight < 1.0:
                    by_fragment.setdefault(tok.fragment, []).append(p + 1)
            jobs += [(c, pos, chunk[pos[0] - 1].weight) for pos in by_fragment.values()]
        if jobs:
            mask = torch.ones(len(jobs), CHUNK + 2, dtype=torch.long)
            for j, (_, pos, _) in enumerate(jobs):
                mask[j, pos] = 0
            masked, _ = self._run(self.slots[index], [ids[c] for c, _, _ in jobs], [chunks[c] for c, _, _ in jobs],
                                  mask)
            for j, (c, pos, w) in enumerate(jobs):
                z_masked = masked[j].float().clone()
                z_masked[pos] = empty.float()[pos]
                out[c] += (1.0 - w) * (z_masked - hidden[c].float())
        return out.to(hidden.dtype)

    # -- all encoders -------------------------------------------------------------------------------------------

    def pad(self, enc: Encoded, chunks: int) -> Encoded:
        """`enc` with empty-prompt chunks appended up to `chunks` (A1111 pads cond/uncond this way)."""
        import torch

        if enc.chunks >= chunks:
            return enc
        empty = torch.cat([self._empty_chunk(i)[0] for i in range(len(self.slots))], dim=-1)
        extra = empty.to(enc.hidden.dtype).unsqueeze(0).expand(chunks - enc.chunks, -1, -1)
        return Encoded(torch.cat([enc.hidden, extra]), enc.pooled)

    def zeros_like(self, enc: Encoded) -> Encoded:
        import torch

        return Encoded(torch.zeros_like(enc.hidden), None if enc.pooled is None else torch.zeros_like(enc.pooled))

    def encode(self, cond: Conditioning, emphasis: str = "original") -> Encoded:
        """Encode fragments (or a blend of them). emphasis: original, none, compel (or ignore: weights unused)."""
        import torch

        if isinstance(cond, Blend):
            parts = [(self.encode(frags, emphasis), w) for frags, w in cond.parts]
            n = max(e.chunks for e, _ in parts)
            parts = [(self.pad(e, n), w) for e, w in parts]
            hidden = sum(e.hidden.float() * w for e, w in parts).to(parts[0][0].hidden.dtype)
            pooled = None
            if parts[0][0].pooled is not None:
                pooled = sum(e.pooled.float() * w for e, w in parts).to(parts[0][0].pooled.dtype)
            return Encoded(hidden, pooled)
        per_slot = [self._encode_slot(i, cond, emphasis) for i in range(len(self.slots))]
        n = max(h.shape[0] for h, _ in per_slot)
        hiddens = []
        for i, (h, _) in enumerate(per_slot):
            if h.shape[0] < n:
                h = torch.cat([h, self._empty_chunk(i)[0].unsqueeze(0).expand(n - h.shape[0], -1, -1)])
            hiddens.append(h)
        pooled = next((p for _, p in per_slot if p is not None), None)
        return Encoded(torch.cat(hiddens, dim=-1) if len(hiddens) > 1 else hiddens[0], pooled)

    def tokens(self, cond: tuple[Fragment, ...], slot: int = 0) -> list[list[Any]]:
        """The chunks of tokens the encoder sees (for explaining)."""
        s = self.slots[slot]
        return chunk_tokens(cond, s.tokenizer, self.embeddings, comma_backtrack=self.comma_backtrack)
