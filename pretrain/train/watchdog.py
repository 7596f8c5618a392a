"""Hangs: a step that takes far longer than the recent ones is reported while it hangs, naming the rank, the step
and the phase (a rank stopped, a peer died, a filesystem froze), and a collective that times out
(``parallel.collective_timeout_s``) ends the run with the same facts instead of a backend traceback."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import TYPE_CHECKING

import torch

from pretrain.train.callbacks import Callback

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer


class Watchdog(Callback):
    """A thread that looks at the loop's current phase once a second and says so (once per phase) when it has run
    ``factor`` times longer than the median of the recent steps and at least ``min_seconds``."""

    def __init__(self, factor: float, min_seconds: float):
        self.factor, self.min_seconds = factor, min_seconds
        self.durations: list[float] = []
        self.step_started = 0.0
        self.warned: tuple | None = None
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def on_run_start(self, trainer: Trainer) -> None:
        self.thread = threading.Thread(target=self._watch, args=(trainer,), name="watchdog", daemon=True)
        self.thread.start()

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self.step_started = time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.durations = (self.durations + [time.perf_counter() - self.step_started])[-20:]

    def on_run_end(self, trainer: Trainer) -> None:
        self.stop()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.stop()

    def stop(self) -> None:
        """End the thread and wait for it: a thread still holding the trainer when the interpreter exits would free
        the model there, during finalization, which aborts the process ("terminate called without an active
        exception")."""
        self.done.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def _watch(self, trainer: Trainer) -> None:
        while not self.done.wait(1.0):
            phase, since = trainer.phase, trainer.phase_started
            typical = statistics.median(self.durations) if self.durations else 0.0
            elapsed = time.perf_counter() - since
            if elapsed > max(self.min_seconds, self.factor * typical) and self.warned != (phase, since):
                self.warned = (phase, since)
                print(f"[watchdog] rank {trainer.rank}: {phase} has taken {elapsed:.0f} s (recent steps take "
                      f"{typical:.2f} s): a rank may have stopped or died, or a collective waits for one; "
                      f"parallel.collective_timeout_s={trainer.cfg.parallel.collective_timeout_s} ends the run if it "
                      "does not come back.", file=sys.stderr, flush=True)


def is_collective_timeout(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text) and (
        "gloo" in text or "nccl" in text or "distbackend" in text or "collective" in text)
