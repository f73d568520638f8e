"""`TrainerRecovery`: never losing progress. The resumable state (`_save_state`, `_restore`), the rollback after a
non-finite loss, gradient or weight (`_rollback`, `_divergence_message`) and SIGINT/SIGTERM as "save and stop"
(`_install_signals`), for `training.loop.Trainer`.

Why apart from the loop: the step says what training does; this says how a run survives a kill, a NaN or a
launcher's forwarded signal, and each of those paths has its own tests (resume after kill -9, rollback, the
double signal).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from sdtune.errors import SdtuneError
from sdtune.training.checkpoint import TrainState, capture_rng, restore_rng
from sdtune.training.parts import TrainerParts

if TYPE_CHECKING:
    import torch

    from sdtune.training.data import Dataset
    from sdtune.training.methods.base import Diverged

# a second SIGINT/SIGTERM sooner than this after the first is the launcher forwarding it (see _install_signals);
# later, it aborts without saving
DUPLICATE_SIGNAL_S = 2.0


class TrainerRecovery(TrainerParts):
    """The state, the rollback and the signals (see the module docstring)."""

    dataset: Dataset
    optimizer: Any
    schedule: Any
    handle_signals: bool
    _initial: dict[str, torch.Tensor]
    _fp16_skips: int
    _signal: int | None
    _stop: str | None

    if TYPE_CHECKING:  # provided by Trainer
        @property
        def epoch(self) -> int: ...

        @property
        def cursor(self) -> int: ...

    def _save_state(self) -> None:
        if not self.ranks.is_main:  # the main process saves; the others wait until the state is there
            self.ranks.barrier()
            return
        extra: dict[str, Any] = {"dataset": self.dataset.fingerprint(), "method": self.method.name,
                                 "processes": self.ranks.world}
        scaler = self.accelerator.scaler
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        state = TrainState(step=self.step, epoch=self.epoch, cursor=self.cursor, weights=self.method.state_dict(),
                           optimizer=self.optimizer.state_dict(), rng=capture_rng(), history=self.ledger.history(fp16_skips=self._fp16_skips),
                           config=self.config.replace(resume=None).to_dict(), extra=extra,
                           snapshots=self.ledger.snapshots)
        self.store.save(state)
        self.ranks.barrier()

    def _restore(self, state: TrainState, *, rng: bool = True) -> None:
        if state.extra.get("method") not in (None, self.method.name):
            raise SdtuneError(f"the saved state is a {state.extra.get('method')!r} run, not {self.method.name!r}")
        self.method.load_state_dict({k: v.to(self.device) for k, v in state.weights.items()})
        self.optimizer.load_state_dict(state.optimizer)
        self.step = state.step
        assert self.batches is not None  # _prepare made it
        self.batches.seek(state.epoch, state.cursor)
        self.ledger.load(state.history, state.snapshots)
        self._fp16_skips = int(state.history.get("fp16_skips", 0))
        scaler = self.accelerator.scaler
        if scaler is not None and "scaler" in state.extra:
            scaler.load_state_dict(state.extra["scaler"])
        if rng:
            restore_rng(state.rng)

    def _rollback(self) -> int:
        """Back to the last saved state of this run (or the initial weights); returns its step."""
        latest = self.store.latest()
        if latest is not None:
            self._restore(self.store.load(latest), rng=False)
            return self.step
        self.method.load_state_dict({k: v.to(self.device) for k, v in self._initial.items()})
        self.optimizer.optimizer.state.clear()
        self.step = 0
        assert self.batches is not None  # _prepare made it
        self.batches.seek(0, 0)
        return 0

    def _divergence_message(self, d: Diverged, good: int) -> str:
        cfg = self.config
        where = f"the state of step {good}" if good else "the initial weights"
        msg = f"training diverged at step {d.step}: non-finite {d.what}; rolled back to {where}, nothing non-finite "\
              "was saved. "
        if cfg.mixed_precision == "fp16":
            msg += "Likely cause: fp16 overflow; use --mixed-precision bf16 (or no)."
        else:
            peak = self.schedule.peak
            if peak > 0.1 and cfg.optimizer != "prodigy":  # a tenth of an absurd rate is still absurd
                msg += (f"Likely cause: the learning rate {peak:g} is far above what training uses (1e-6 for a "
                        "full fine-tune to 5e-3 for Textual Inversion); leave --lr out for the method's default")
            else:
                msg += f"Likely cause: the learning rate is too high (peak {peak:g}); try {peak / 10:g}"
            msg += " and --max-grad-norm 1." if cfg.max_grad_norm == 0 else "."
        return msg

    def _install_signals(self) -> dict[int, Any]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}

        first: list[float] = []

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:
                # A launcher forwards the signal its process group already got (Ctrl-C under torchrun: SIGINT from
                # the terminal, then SIGTERM from torchrun): a second signal that soon is the same request, not a
                # user asking to abort without saving.
                if time.monotonic() - first[0] < DUPLICATE_SIGNAL_S:
                    return
                raise KeyboardInterrupt
            first.append(time.monotonic())
            self._signal = signum
            self._stop = "interrupted"
            self.echo(f"{signal.Signals(signum).name}: stopping after this step and saving the state "
                      "(again to abort without saving)")

        old: dict[int, Any] = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
        return old
