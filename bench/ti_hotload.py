"""Hot loading of Textual Inversion embeddings (not a test): how long a long-lived Generator takes to pick up a
new embedding file in its folder, against loading the model.

    python bench/ti_hotload.py [--model tiny|random|FOLDER] [--files 50] [--repeats 20]

Measures (medians): loading the model (`load_model`); `EmbeddingLibrary.refresh()` when nothing changed (the cost
every image pays to notice changes) with --files embeddings in the folder; picking up one new file; picking up one
file overwritten in place; and the ratio model load / pick-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from prompt_encoding import machine

    from sdtune.adapters.textual_inversion import Embedding, write_embedding
    from sdtune.generate import Generator
    from sdtune.models import load_model

    print(machine())
    spec = args.model
    tmp = Path(tempfile.mkdtemp(prefix="ti-hotload-"))
    if spec == "random" or (spec == "tiny" and not _tiny_exists()):
        from diffusers import StableDiffusionPipeline

        from sdtune.toy.tiny import build_components

        comps = build_components(seed=0, tokenizer_dir=tmp / "model" / "tokenizer")
        StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(tmp / "model")
        spec = str(tmp / "model")
        print("model: a random tiny SD1 folder (bundled tiny model absent)")
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        model = load_model(spec, device="cpu")
        loads.append(time.perf_counter() - t0)
    load_s = statistics.median(loads)
    width = model.pipe.text_encoder.config.hidden_size
    folder = tmp / "embeddings"
    for i in range(args.files):
        write_embedding(Embedding(f"e{i}", {"*": torch.randn(2, width)}), folder / f"sub{i % 5}" / f"e{i}.safetensors",
                        "safetensors")
    gen = Generator(model, embeddings=[folder])
    lib = gen.embeddings
    assert len(lib.names) == args.files
    idle, new, overwrite = [], [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        lib.refresh()
        idle.append(time.perf_counter() - t0)
        path = folder / f"new{r}.safetensors"
        write_embedding(Embedding(f"new{r}", {"*": torch.randn(2, width)}), path, "safetensors")
        t0 = time.perf_counter()
        ch = lib.refresh()
        new.append(time.perf_counter() - t0)
        assert ch.added == [f"new{r}"], ch
        write_embedding(Embedding(f"e0", {"*": torch.randn(2, width)}), folder / "sub0" / "e0.safetensors",
                        "safetensors")
        t0 = time.perf_counter()
        ch = lib.refresh()
        overwrite.append(time.perf_counter() - t0)
        assert ch.changed == ["e0"], ch
    med = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"model load ({spec}): {load_s * 1000:.0f} ms (median of 3)")
    print(f"refresh, nothing changed, {args.files} files in 6 folders: {med(idle):.2f} ms")
    print(f"pick up a new embedding file: {med(new):.2f} ms; an overwritten one: {med(overwrite):.2f} ms")
    print(f"model load / pick-up of a new file: {load_s * 1000 / med(new):.0f}x")


def _tiny_exists() -> bool:
    from sdtune.toy.tiny import tiny_model_path

    return (tiny_model_path() / "model_index.json").exists()


if __name__ == "__main__":
    main()
