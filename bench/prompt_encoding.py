"""Benchmark (not a test): prompt parsing speed, and the cost of sdtune's weighted encoding against diffusers'.

    python bench/prompt_encoding.py [--model tiny|random|clip-l|FOLDER] [--repeats 30]

`clip-l` is the random tiny SD1 pipeline with a randomly initialised text encoder of CLIP ViT-L/14's size (12
layers, width 768, 123M parameters; built from a config, nothing downloaded), where encoding costs what it does
with a real SD1 model.

Parsing: prompts/s for a mix of A1111 (weights, BREAK, prompt editing, AND) and compel prompts, each one unique so
no cache helps. Encoding: a 300-token weighted prompt (4 chunks of 75). diffusers' `encode_prompt` truncates at 77
tokens, so the fair reference is diffusers encoding the same 4 chunks' text, 4 calls; sdtune encodes the whole
prompt once (all chunks in one batch). Also shown: the raw text encoder on the same 4x77 ids in one batch (the
floor any method pays) and a plain 1-chunk prompt, ours against diffusers. Same process, same thread count; medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.platform()}; CPU {cpu}; {os.cpu_count()} cores; python {platform.python_version()}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} thread(s))")


def load(model: str):
    from sdtune.models.testing import tiny_pipeline

    if model == "random":
        return tiny_pipeline("sd1"), "tiny_pipeline('sd1') (random, CLIP vocab, width 64, 2 layers)"
    if model == "clip-l":
        from sdtune.models.testing import clip_l_text_encoder

        pipe = tiny_pipeline("sd1")
        pipe.text_encoder = clip_l_text_encoder(seed=0)
        return pipe, "tiny_pipeline('sd1') with a random CLIP ViT-L/14-size text encoder (12 layers, width 768)"
    if model == "tiny":
        from sdtune.toy.tiny import tiny_model_path

        path = tiny_model_path()
        if not (path / "model_index.json").exists():
            return tiny_pipeline("sd1"), "tiny_pipeline('sd1') (bundled tiny model not present yet)"
        model = str(path)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None), model


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sdtune.prompts import TextConditioner, attention_fragments, parse_prompt
    from sdtune.prompts.parse import conditioning

    print(machine())

    # -- parsing -----------------------------------------------------------------------------------------------
    base = [
        "masterpiece, best quality, a (red:1.3) circle on a ((white)) background, [blurry], (sharp:0.8)",
        "a [cat:dog:0.5] sitting on a [sofa|chair], (((detailed))) BREAK cinematic lighting, 4k",
        "a castle on a hill AND a dragon in the sky :0.6 AND (storm clouds:1.2) :0.3",
        "a cat playing with a ball++ in the (forest)1.3, (blurry)--, \"soft light\"1.1",
        '("a red cat", "a blue dog").blend(0.7, 0.3)',
    ]
    n = 4000
    prompts = [f"{base[i % len(base)]} {i}" for i in range(n)]
    conditioning.cache_clear()
    start = time.perf_counter()
    for p in prompts:
        parse_prompt(p, steps=20)
    rate = n / (time.perf_counter() - start)
    print(f"parsing: {rate:,.0f} prompts/s ({n} unique prompts, ~{sum(map(len, prompts)) // n} characters each, "
          "syntax auto, 20 steps)")

    # -- encoding ------------------------------------------------------------------------------------------------
    pipe, name = load(args.model)
    print(f"model: {name}")
    tok = pipe.tokenizer
    vocab_words = [w for w in ("red", "blue", "green", "circle", "square", "triangle", "white", "black", "background",
                               "on", "a", "of", "photo", "cross", "star")
                   if len(tok(w, add_special_tokens=False).input_ids) == 1]
    chunk_texts = []
    for c in range(4):
        words = [vocab_words[(c * 7 + i) % len(vocab_words)] for i in range(75)]
        chunk_texts.append(" ".join(words))
    # weighted version of the same 300 tokens: every 5th word weighted, chunked exactly at 75 (BREAK)
    def weighted(text: str) -> str:
        return " ".join(f"({w}:1.2)" if i % 5 == 0 else w for i, w in enumerate(text.split()))
    prompt = " BREAK ".join(weighted(t) for t in chunk_texts)
    frags = attention_fragments(prompt)
    enc = TextConditioner(pipe)
    assert enc.encode(frags).chunks == 4
    device = pipe._execution_device

    def diffusers_4x():
        with torch.no_grad():
            for t in chunk_texts:
                pipe.encode_prompt(t, device, 1, False)

    def ours(mode: str):
        return lambda: TextConditioner(pipe).encode(attention_fragments(prompt), mode)

    ids = torch.tensor([tok(t, padding="max_length", max_length=77).input_ids for t in chunk_texts])

    def raw():
        with torch.no_grad():
            pipe.text_encoder(ids)

    t_ref = timed(diffusers_4x, args.repeats)
    t_raw = timed(raw, args.repeats)
    print(f"300-token prompt (4 chunks): diffusers encode_prompt x4 (unweighted chunks) {t_ref * 1e3:.2f} ms; "
          f"raw text encoder, 4x77 batch {t_raw * 1e3:.2f} ms")
    for mode in ("original", "none"):
        t = timed(ours(mode), args.repeats)
        print(f"  sdtune, weighted, emphasis {mode:8s} (parse + tokenize + encode): {t * 1e3:.2f} ms = "
              f"{t / t_ref:.2f}x diffusers x4, {t / t_raw:.2f}x raw encoder")
    compel_prompt = " ".join(f"({w})1.2" if i % 25 == 0 else w for i, w in enumerate(" ".join(chunk_texts).split()))
    from sdtune.prompts import parse_compel

    t = timed(lambda: TextConditioner(pipe).encode(parse_compel(compel_prompt), "compel"), args.repeats)
    print(f"  sdtune, compel syntax, up-weights only, emphasis compel: {t * 1e3:.2f} ms = {t / t_ref:.2f}x diffusers x4")

    plain = chunk_texts[0][:200]
    t_d = timed(lambda: pipe.encode_prompt(plain, device, 1, True, negative_prompt="blurry"), args.repeats)
    from sdtune.prompts import WeightedPromptEncoder

    w = WeightedPromptEncoder()
    t_o = timed(lambda: w(pipe, plain, "blurry", num_images=1, do_cfg=True, clip_skip=1), args.repeats)
    print(f"plain 1-chunk prompt + negative: diffusers {t_d * 1e3:.2f} ms, sdtune {t_o * 1e3:.2f} ms = "
          f"{t_o / t_d:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
