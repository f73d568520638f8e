"""Runs several `sdtune ...` commands one after another in one process, for tests/test_distributed.py to launch
under `torchrun --nproc_per_node N` (one launch, one process-group start, several runs). Usage:
    torchrun --nproc_per_node 2 tests/dist_worker.py '[["train", "lora", ...], ["train", "ti", ...]]'
Exits with the first non-zero exit code.

SDTUNE_TEST_NAN=RANK:STEP:NAME makes that rank's training loss NaN at that step of the run whose --out folder is
named NAME (only there), to test that one rank's NaN rolls every rank back."""

from __future__ import annotations

import json
import os
import sys

import torch

if __name__ == "__main__":
    torch.set_num_threads(1)
    from sdtune.cli.testing import exit_code

    if os.environ.get("SDTUNE_TEST_NAN"):
        from sdtune.training.loop import Trainer

        rank_s, step_s, nan_out = os.environ["SDTUNE_TEST_NAN"].split(":")
        nan_rank, nan_step = int(rank_s), int(step_s)
        real_loss = Trainer._loss

        def poisoned(self, batch, gen):  # type: ignore[no-untyped-def]
            loss = real_loss(self, batch, gen)
            if self.ranks.rank == nan_rank and batch.step == nan_step and self.out.name == nan_out:
                loss = loss * float("nan")
            return loss

        Trainer._loss = poisoned  # type: ignore[method-assign]

    for argv in json.loads(sys.argv[1]):
        code = exit_code(argv)
        if code:
            sys.exit(code)
