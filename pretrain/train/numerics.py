"""A diverging run never destroys its good state: steps whose gradient norm is NaN or infinite are skipped by the
engine (weights and optimizer state untouched, ``train.skip_nonfinite``); ``NonFiniteGuard`` counts them, and after
``train.max_nonfinite_steps`` in a row either stops the run (exit code 2, nothing saved, the last checkpoint
named) or, with ``train.nonfinite_rollback``, reloads the newest checkpoint and skips the batches read since it,
as PaLM did for its loss spikes (at most ``MAX_ROLLBACKS`` times a run, each recorded in the metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pretrain.errors import UserError
from pretrain.train.callbacks import Callback

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer

MAX_ROLLBACKS = 3


class RunDiverged(UserError):
    """The run stopped because its gradients stayed non-finite (a user-facing outcome: exit code 2)."""


class NonFiniteGuard(Callback):
    state_key = "nonfinite"

    def __init__(self, limit: int, rollback: bool):
        self.limit, self.rollback = limit, rollback
        self.in_a_row, self.first_bad, self.skipped, self.rollbacks = 0, 0, 0, []

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if trainer.engine.stepped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        self.first_bad = self.first_bad if self.in_a_row > 1 else step
        trainer.log(f"step {step}: the gradient norm is not finite ({float(grad_norm)}); the optimizer step was "
                    f"skipped ({self.in_a_row} of {self.limit} in a row allowed)")
        if self.in_a_row < self.limit:
            return
        if self.rollback and len(self.rollbacks) < MAX_ROLLBACKS:
            position = trainer.state["consumed_samples"]
            restored = trainer.rollback()
            if restored is not None:
                record = {"step": step, "rollback_to_step": trainer.state["step"], "rollback_checkpoint": restored.name,
                          "skipped_samples": [restored_position(trainer, restored), position]}
                self.rollbacks.append(record)
                trainer.metrics.log(record)
                trainer.log(f"rolled back to {restored} after {self.in_a_row} non-finite steps; the samples "
                            f"{record['skipped_samples'][0]}..{position - 1} are skipped")
                self.in_a_row = 0
                return
        newest = trainer.newest_checkpoint()
        raise RunDiverged(
            f"the gradient norm was NaN or infinite for {self.in_a_row} steps in a row (steps {self.first_bad}-{step}), "
            f"so the run stopped; weights and optimizer state are unchanged since step {self.first_bad - 1}. The newest "
            f"checkpoint{f' ({newest}) is intact' if newest else ': none was written yet'}. Lower optim.lr, raise "
            "optim.warmup_steps or check the data; train.nonfinite_rollback=true reloads the newest checkpoint and "
            "skips the offending batches instead; train.max_nonfinite_steps sets how many skipped steps are tolerated.")

    def metrics(self, trainer: Trainer, step: int) -> dict:
        return {"skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.rollbacks = state["skipped"], list(state["rollbacks"])


def restored_position(trainer: Trainer, path) -> int:
    from pretrain.train import checkpoint

    return checkpoint.read_state(path)["consumed_samples"]
