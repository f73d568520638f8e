"""How much the identifier moves the frozen text encoder's output (docs/lora.md, "Keeping the base model"):
the norm of the difference between the encodings of a caption with and without `sks`, next to the same caption
with the shape word changed. A small first number is why a frozen-text LoRA learns `sks` slowly.

    python experiments/identifier_signal.py [--model tiny]
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    import torch

    from sdtune.models import load_model

    pipe = load_model(args.model).pipe
    texts = ["a red sks shape on a blue background", "a red shape on a blue background",
             "a red circle on a blue background"]
    with torch.no_grad():
        enc = pipe.encode_prompt(texts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    print(f"|with sks - without|   = {(enc[0] - enc[1]).norm():.1f}")
    print(f"|'shape' - 'circle'|   = {(enc[1] - enc[2]).norm():.1f}")
    print(f"|without sks| (scale)  = {enc[1].norm():.1f}")


if __name__ == "__main__":
    main()
