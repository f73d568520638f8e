"""Do the *default* settings of `sdtune train lora` / `sdtune train dreambooth` keep the base model? (issue 21, part 4)

Runs the CLI exactly as a user would, with the README's commands, on a shape the run never names:

    sdtune toy dataset --shape SHAPE -n 20 --caption "a {colour} sks shape on a {background} background" --out D
    sdtune train lora --data D --out R --output-name SHAPE --steps 800 --lr 1e-3 --batch-size 4 --rank 8 --alpha 8 \
        --target attn --target ff --target conv                        # the README's LoRA command
    sdtune train dreambooth --data D --out R                            # DreamBooth with every default

then measures with experiments/accept_lora.py's judge metrics: the identifier prompt "a sks shape" (16 seeds),
the 23 context prompts (unseen colour/background pairs included, 2 seeds), and 16 base prompts without the
identifier x 3 seeds (judge agreement, compared with the base model's on the same prompts and seeds).

    nice -n 10 python experiments/accept_defaults.py --out runs/defaults --method lora --shape heart
    python experiments/accept_defaults.py --out runs/defaults --method base --shape diamond    # the base model
    python experiments/accept_defaults.py --out runs/defaults --method lora --shape heart --tag prior \
        --extra=--prior-preservation                                     # the automatic prior, for comparison
    python experiments/accept_defaults.py --out runs/defaults --summary

Results: OUT/<method>_<shape>[_<tag>]/result.json; the CLI's log beside it (train.log).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import accept_lora  # noqa: E402  (the metrics)

CAPTION = "a {colour} sks shape on a {background} background"
README_LORA = ["--steps", "800", "--lr", "1e-3", "--batch-size", "4", "--rank", "8", "--alpha", "8",
               "--target", "attn", "--target", "ff", "--target", "conv"]
SDTUNE = [sys.executable, "-m", "sdtune"]


def run(cmd: list[str], log: Path) -> None:
    print("$", shlex.join(cmd[2:] if cmd[:2] == SDTUNE[:2] else cmd), flush=True)
    with log.open("a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/defaults"))
    ap.add_argument("--method", choices=("base", "lora", "dreambooth"), default="lora")
    ap.add_argument("--shape", default="heart", help="the toy world's shape to learn (heart, diamond, star)")
    ap.add_argument("--tag", default="", help="a suffix for the result folder (variants with --extra)")
    ap.add_argument("--extra", default="", help="more CLI flags for the train command, e.g. --no-prior-preservation")
    ap.add_argument("--file", default=None, help="judge this trained file instead of training (with --tag, and "
                    "--command saying how it was made)")
    ap.add_argument("--command", default="", help="with --file: the command that made it, for the table")
    ap.add_argument("--word", default="", help="the word prompts use for the concept instead of sks (pivotal runs: "
                    "the new word, e.g. '<s0><s1>'); base prompts never contain it")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--gen-steps", type=int, default=20)
    ap.add_argument("--ident-seeds", type=int, default=16)
    ap.add_argument("--ctx-seeds", type=int, default=2)
    ap.add_argument("--base-prompts", type=int, default=16)
    ap.add_argument("--base-seeds", type=int, default=3)
    args = ap.parse_args()
    if args.summary:
        print(summary(args.out))
        return
    import torch

    torch.set_num_threads(1)
    from sdtune.generate import Generator

    name = f"{args.method}_{args.shape}" + (f"_{args.tag}" if args.tag else "")
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "train.log"
    res: dict = {"variant": name, "method": args.method, "shape": args.shape}
    if args.method == "base":
        gen = Generator(args.model)
    elif args.file:
        res.update(command=args.command, file=args.file)
        gen = Generator(args.file) if args.method == "dreambooth" else Generator(args.model, loras=[(args.file, 1.0)])
    else:
        data = args.out / f"data_{args.shape}"
        if not (data / "0019.png").exists():
            run(SDTUNE + ["toy", "dataset", "--shape", args.shape, "-n", "20", "--caption", CAPTION, "--out",
                          str(data)], log)
        cmd = SDTUNE + ["train", args.method, "--data", str(data), "--out", str(folder / "run"), "--output-name",
                        args.shape, "--no-progress"]
        if args.method == "lora":
            cmd += README_LORA
        cmd += shlex.split(args.extra)
        t = time.perf_counter()
        run(cmd, log)
        res.update(train_s=time.perf_counter() - t, command=shlex.join(["sdtune"] + cmd[3:]))
        final = folder / "run" / f"{args.shape}.safetensors"
        gen = Generator(str(final)) if args.method == "dreambooth" else Generator(args.model, loras=[(str(final), 1.0)])
    if args.word:
        gen = WordSwap(gen, args.word)
        res["word"] = args.word
    res.update(accept_lora.evaluate_model(gen, args))
    (folder / "result.json").write_text(json.dumps(res, indent=1))
    print(summary(args.out))


class WordSwap:
    """A Generator whose prompts say `word` where the metric prompts say sks."""

    def __init__(self, gen, word: str) -> None:
        self.gen, self.word = gen, word

    def generate(self, params, **kw):
        import dataclasses
        import re

        prompt = re.sub(r"\bsks\b", self.word, params.prompt)
        return self.gen.generate(dataclasses.replace(params, prompt=prompt), **kw)


def summary(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    base = {r["shape"]: r for r in rows if r["method"] == "base"}
    ref = next(iter(base.values()), None)
    lines = ["| run | train time | identifier prompt: the shape | context prompts: the shape | context kept | "
             "base prompts: judge agreement (of the base's) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = r["base"]["agreement"]
        rel = f" ({100 * b / ref['base']['agreement']:.0f}% of base)" if ref and r["method"] != "base" else ""
        t = f"{r['train_s'] / 60:.1f} min" if "train_s" in r else "-"
        lines.append(f"| {r['variant']} | {t} | {100 * r['identifier']['heart']:.0f}% of {r['identifier']['images']} "
                     f"| {100 * r['context']['heart']:.0f}% of {r['context']['images']} | "
                     f"{100 * r['context']['context']:.0f}% | {100 * b:.1f}%{rel} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
