"""What the training loop needs to run as several processes (`accelerate launch`, `torchrun`), kept small and
explicit so the one loop stays one loop.

The model is NOT wrapped in DistributedDataParallel: every rank computes the gradients of its shard of the global
batch and `average_grads` all-reduces the trainable parameters' gradients once per optimizer step. That is what DDP
computes (without overlapping communication and backward), and it needs no `find_unused_parameters` for text
encoders, LoRA layers that a step does not reach, or textual inversion's single embedding matrix. Each rank keeps
its own copy of every frozen weight.

Rules the loop follows with a `Ranks`:
* every rank reads, only the main rank writes (checkpoints, state, log, summary, samples, the final file);
* everything that decides control flow (a non-finite loss, a stop request, evaluation metrics) is reduced or
  broadcast, so every rank takes the same branch (one rank's NaN rolls every rank back);
* the global batch is `batch_size x processes`; rank r trains on a contiguous slice of it and draws its noise as
  the slice of the global batch's noise, so N processes train what one process with the whole batch trains.

With one process (`world == 1`) every call here is a no-op that returns its input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sdtune.errors import SdtuneError

# what `accelerate launch --use_deepspeed / --use_fsdp / --use_megatron_lm` (or an `accelerate config` choosing them)
# tells the processes it starts; accelerate would wrap the model only if the model went through `prepare`
ENGINE_FLAGS = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP",
                "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def launched_as_other_rank() -> bool:
    """True in a process of a multi-process launch that is not the main one (before the accelerator exists:
    torchrun and `accelerate launch` set RANK)."""
    import os

    return int(os.environ.get("RANK", "0") or 0) != 0


def check_launch_engine(env: Mapping[str, str] | None = None) -> None:
    """Refuse a launch that asks for DeepSpeed, FSDP or Megatron-LM. sdtune hands accelerate its optimizer only and
    all-reduces gradients itself (`Ranks.average_grads`), so such an engine would shard or offload nothing: the run
    would train as plain data parallel while the user believes ZeRO/FSDP saves memory (or fail deep in accelerate).
    Called before the model loads."""
    env = os.environ if env is None else env
    for var, engine in ENGINE_FLAGS.items():
        if str(env.get(var, "false")).lower() == "true":
            raise SdtuneError(f"{engine} was asked for by the launcher ({var}=true: `accelerate launch "
                              f"--use_{engine.lower().replace('-', '_')}` or an `accelerate config` choosing it), "
                              "but sdtune does not hand its model to it, so nothing would be sharded or offloaded; "
                              "launch with `accelerate launch --multi_gpu` or `torchrun` (docs/multi_gpu.md)")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes, and the device the collectives use."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable, shared by design

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> Ranks:
        return cls(int(accelerator.process_index), int(accelerator.num_processes), torch.device(accelerator.device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main rank runs the block first (e.g. generates class images into OUT), the others wait and then run
        it too (finding the files made): things built once and shared through the output folder."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def sum(self, value: float) -> float:
        """The sum over ranks (a NaN on any rank makes it NaN on every rank)."""
        return self._sum([value])[0] if self.distributed else value

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank."""
        return self.sum(1.0 if flag else 0.0) > 0 if self.distributed else flag

    def broadcast(self, obj: Any) -> Any:
        """The main rank's `obj` on every rank (pickled between this run's own processes, never read from a file)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Every rank's gradients replaced by their mean over ranks (what DDP does), in one flat buffer per dtype."""
        if not self.distributed:
            return
        params = list(params)
        reached = self._sum([0.0 if p.grad is None else 1.0 for p in params])
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p, n in zip(params, reached):
            if n == 0:  # no rank reached it: no gradient, as with one process (AdamW then skips it)
                continue
            if p.grad is None:  # another rank reached it: a zero gradient here, as DDP would average it
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            grads = [p.grad for p in group if p.grad is not None]  # all of them (filled above)
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def shard(self, n: int) -> tuple[int, int]:
        """(start, stop) of this rank's contiguous slice of a global batch of `n` (ranks beyond `n` get none)."""
        per = -(-n // self.world)
        start = min(n, self.rank * per)
        return start, min(n, start + per)


SINGLE = Ranks()
