"""Preemption and time limits: on SIGTERM or SIGUSR1 the trainer finishes the step it is in, writes a
checkpoint, leaves ``RUN_DIR/preempted`` (holding the step) and exits with ``EXIT_PREEMPTED``; the next
run with ``train.resume: auto`` continues from that checkpoint, so no step is lost or repeated.

SLURM's ``#SBATCH --signal=B:USR1@120`` warns before the time limit; slurm/train.sbatch forwards the signal
to the tasks and requeues the job when it finds the marker. The ranks may see the signal at different
moments, so the decision to stop is all-reduced: every rank stops after the same step. That all-reduce reads a
device value, so a multi-process run does it only every ``train.signal_check_interval`` steps; a single process
reads its own flag after every step, which costs nothing.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pretrain.train.callbacks import Callback

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a temporary failure, run again to continue
MARKER = "preempted"


class StopOnSignal(Callback):
    """Catches SIGTERM and SIGUSR1 for the run and asks the loop to stop after the step in which every rank knows."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, interval: int = 1):
        self.interval = interval
        self.received: int | None = None
        self.stopped = False
        self._previous: dict = {}

    def on_run_start(self, trainer: Trainer) -> None:
        if trainer.rank == 0:
            clear(trainer.run_dir)
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test harness): signals stay with the caller
                pass

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        flag = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            if step % self.interval:
                return
            t = torch.tensor([1.0 if flag else 0.0], device=trainer.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self.stopped = True
            trainer.request_stop()

    def on_run_end(self, trainer: Trainer) -> None:
        self._restore()
        if self.stopped and trainer.rank == 0:
            mark(trainer.run_dir, trainer.state["step"])
            trainer.log(f"stopped by a signal after step {trainer.state['step']}; run again (train.resume: auto) "
                        "to continue")

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def mark(run_dir: Path, step: int) -> None:
    (run_dir / MARKER).write_text(f"{step}\n")


def clear(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)
