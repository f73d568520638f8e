"""The `tiny` model: the exact SD1.x architecture (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer) at toy size, so that every code path written for real checkpoints runs unchanged on it.

`build_components()` makes randomly initialised components (tests use them directly);
`sdtune toy build-tiny` (`sdtune.toy.build_tiny`) trains them on the toy world and `tiny_model_path()` points at the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtune.models.tokenizer import bytes_to_unicode
from sdtune.toy.world import vocabulary_words

TEXT_WIDTH = 64
LATENT_SIZE = 16

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    # SD1's four levels and block classes; like SDXL, no attention at the highest resolution (it would double
    # the cost of a CPU step for little gain on 64x64 images).
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96, 96),
    layers_per_block=1,
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=2,  # SD1's config field: it is the number of heads (2 keeps CPU attention fast)
    norm_num_groups=16,
)

TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=TEXT_WIDTH,
)

SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = word[i], word[i + 1]
        out, j = [], 0
        while j < len(word):
            if j < len(word) - 1 and word[j] == a and word[j + 1] == b:
                out.append(a + b)
                j += 2
            else:
                out.append(word[j])
                j += 1
        word = tuple(out)
    return word


def write_tokenizer(folder: Path, words: list[str] | None = None) -> None:
    """Write a CLIPTokenizer (vocab.json, merges.txt) whose words are single tokens and any other text falls back
    to byte characters, with CLIP's real special tokens. Merges are derived so that each word BPE-encodes to itself."""
    words = words or vocabulary_words()
    alphabet = list(bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        start = tuple(w[:-1]) + (w[-1] + "</w>",)
        for _ in range(64):
            pieces = _bpe(start, ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
        if _bpe(start, ranks) != (w + "</w>",):
            raise RuntimeError(f"could not make {w!r} a single token")
    seen: dict[str, int] = {}
    for tok in vocab_list + ["<|startoftext|>", "<|endoftext|>"]:
        seen.setdefault(tok, len(seen))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(seen, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}))


def build_components(seed: int = 0, tokenizer_dir: Path | None = None) -> dict:
    """Randomly initialised tiny SD1-architecture components: vae, unet, text_encoder, tokenizer, scheduler."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if tokenizer_dir is None:
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="sdtune-tok-"))
    if not (Path(tokenizer_dir) / "vocab.json").exists():
        write_tokenizer(Path(tokenizer_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tiny_model_path() -> Path:
    """The bundled, trained tiny model (a diffusers pipeline folder inside the package)."""
    from sdtune.models.bundled import bundled_model_path

    return bundled_model_path(check=False)
