"""Runs several `sdtune ...` commands one after another in one process, for tests/test_distributed.py to launch
under `torchrun --nproc_per_node N` (one launch, one process-group start, several runs). Usage:
    torchrun --nproc_per_node 2 tests/dist_worker.py '[["train", "lora", ...], ["train", "ti", ...]]'
Exits with the first non-zero exit code."""

from __future__ import annotations

import json
import sys

import torch

if __name__ == "__main__":
    torch.set_num_threads(1)
    from sdtune.cli.testing import exit_code

    for argv in json.loads(sys.argv[1]):
        code = exit_code(argv)
        if code:
            sys.exit(code)
