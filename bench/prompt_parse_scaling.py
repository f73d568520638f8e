"""Prompt parsing must be linear in the prompt's length (bad-input issue: `parse_prompt(" " * n + "x")` took 1.2 s of
CPU at n = 8,000, quadratic in A1111's split patterns). Times parse_prompt on prompts of n spaces + a word, and of n
words, for doubling n, and prints the time ratio per doubling (about 2 when linear, about 4 when quadratic).

    python bench/prompt_parse_scaling.py [--max 128000]
"""

from __future__ import annotations

import argparse
import time

from prompt_encoding import machine


def seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max", type=int, default=128000)
    args = p.parse_args()
    from sdtune.prompts.parse import parse_prompt

    print(machine())
    for label, make in (("spaces", lambda n: " " * n + "x"), ("words", lambda n: "cat " * (n // 4)),
                        ("spaces + AND + BREAK", lambda n: " " * n + "a AND b BREAK c :0.5")):
        print(f"{label}:")
        previous = None
        n = 2000
        while n <= args.max:
            text = make(n)
            s = seconds(lambda: parse_prompt(text))
            ratio = f"  x{s / previous:.2f} per doubling" if previous else ""
            print(f"  n={n:>7}: {s * 1000:8.2f} ms{ratio}")
            previous, n = s, n * 2


if __name__ == "__main__":
    main()
