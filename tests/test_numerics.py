"""A diverging run never destroys good state: non-finite steps are skipped with weights and optimizer state
untouched, the run stops with exit code 2 (or rolls back) after a few in a row, no checkpoint is written from
non-finite weights, and metrics.jsonl stays valid JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.train import checkpoint
from pretrain.train.callbacks import Callback
from pretrain.train.numerics import RunDiverged
from pretrain.train.trainer import Trainer
from tests.conftest import run_cli
from tests.test_safe_load import forge_integrity


def quiet(*_a, **_k):
    pass


class PoisonGrads(Callback):
    """Makes one gradient NaN after the backward of the given global batches (numbered by data position, 0 first):
    bad data, or a fault in the kernels."""

    def __init__(self, batches: set[int]):
        self.batches = batches

    def on_after_backward(self, trainer, step):
        if trainer.state["consumed_samples"] // trainer.cfg.data.global_batch_size in self.batches:
            next(trainer.model.parameters()).grad.view(-1)[0] = float("nan")


class Snapshot(Callback):
    """Weights and AdamW state before and after each given step."""

    def __init__(self, steps: set[int]):
        self.steps, self.before, self.after = steps, {}, {}

    def _copy(self, trainer):
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                 for p, s in trainer.optimizer.state.items()}
        return weights, state

    def on_step_start(self, trainer, step):
        if step in self.steps:
            self.before[step] = self._copy(trainer)

    def on_step_end(self, trainer, step, loss, grad_norm):
        if step in self.steps:
            self.after[step] = self._copy(trainer)


def strict_records(run_dir) -> list[dict]:
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_nonfinite_steps_leave_weights_and_optimizer_state_untouched(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=8", "train.eval_interval=0", "checkpoint.interval=0")
    trainer = Trainer(cfg, log=quiet)
    snapshot = Snapshot({4, 5})
    trainer.callbacks += [PoisonGrads({3}), snapshot]  # the batch of step 4
    result = trainer.fit()
    assert result["step"] == 8
    for step, changed in ((4, False), (5, True)):
        (w0, s0), (w1, s1) = snapshot.before[step], snapshot.after[step]
        same = all(torch.equal(w0[n], w1[n]) for n in w0)
        same_state = all(torch.equal(s0[k][key], s1[k][key]) for k in s0 for key in s0[k])
        assert same is not changed and same_state is not changed, step
    recs = strict_records(cfg.train.run_dir)  # valid JSON: the NaN loss and norm of step 4 are null
    step4 = next(r for r in recs if r.get("step") == 4 and "loss" in r)
    assert step4["grad_norm"] is None and step4["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in recs if "loss" in r and r["step"] != 4)


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_checkpoints(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=12", "train.eval_interval=0", "checkpoint.interval=2", "checkpoint.keep=1",
                   "train.max_nonfinite_steps=3")
    trainer = Trainer(cfg, log=quiet)
    trainer.callbacks.append(PoisonGrads(set(range(4, 12))))  # steps 5 on
    with pytest.raises(RunDiverged, match=r"3 steps in a row \(steps 5-7\).*since step 4.*step_0000006\) is intact"):
        trainer.fit()
    root = Path(cfg.train.run_dir) / "checkpoints"
    # step 6 came inside the skipped stretch: its weights are step 4's, finite, so it was saved; nothing after
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_0000006"]


def test_no_checkpoint_is_written_from_nonfinite_weights(tiny_cfg):
    class CorruptWeight(Callback):
        def on_step_end(self, trainer, step, loss, grad_norm):
            if step == 3:
                with torch.no_grad():
                    trainer.model.norm.weight[0] = float("inf")  # the final norm: every token goes through it

    cfg = tiny_cfg("train.max_steps=12", "train.eval_interval=0", "checkpoint.interval=2", "checkpoint.keep=1",
                   "train.max_nonfinite_steps=5")
    trainer = Trainer(cfg, log=quiet)
    trainer.callbacks.append(CorruptWeight())
    with pytest.raises(RunDiverged):
        trainer.fit()
    root = Path(cfg.train.run_dir) / "checkpoints"
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_0000002"]  # keep=1 deleted nothing


def test_rollback_reloads_the_newest_checkpoint_and_skips_the_bad_batches(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=10", "train.eval_interval=0", "checkpoint.interval=4",
                   "train.max_nonfinite_steps=2", "train.nonfinite_rollback=true")
    trainer = Trainer(cfg, log=quiet)
    read = trainer.train_batches
    positions: list[int] = []
    trainer.train_batches = lambda position: positions.append(position) or read(position)
    trainer.callbacks.append(PoisonGrads({4, 5}))  # the batches of steps 5 and 6
    result = trainer.fit()
    assert result["step"] == 10
    gbs = cfg.data.global_batch_size
    # steps 5 and 6 read positions 4 and 5 (in batches); the rollback to step 4 goes on from position 6
    assert [p // gbs for p in positions] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    recs = strict_records(cfg.train.run_dir)
    rollback = next(r for r in recs if "rollback_to_step" in r)
    assert rollback["rollback_to_step"] == 4 and rollback["skipped_samples"] == [4 * gbs, 6 * gbs]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    assert math.isfinite([r for r in recs if "loss" in r][-1]["loss"])


@pytest.mark.parametrize("override,key", [("optim.lr=.inf", "optim.lr"), ("optim.lr=1e6", "optim.lr"),
                                          ("optim.eps=-1e-8", "optim.eps"), ("model.init_std=.nan", "model.init_std")])
def test_nonfinite_and_absurd_hyperparameters_are_refused_at_load(tiny_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_cfg(override)


@pytest.mark.slow
def test_cli_run_from_a_corrupted_checkpoint_exits_2_and_keeps_it(tiny_overrides, tmp_path):
    """A weight corrupted on disk: every step is non-finite, the run stops with exit code 2 and the message, and the
    checkpoint it resumed from is still there."""
    from pretrain.config import load_config
    from pretrain.train.trainer import run_training

    common = ["configs/quickstart.yaml", *tiny_overrides, "train.eval_interval=0", "checkpoint.keep=1",
              "checkpoint.interval=2"]
    run_training(load_config(common[0], [*common[1:], "train.max_steps=2"]), log=quiet)
    step = tmp_path / "run" / "checkpoints" / "step_0000002"
    trainer = Trainer(load_config(common[0], [*common[1:], "train.max_steps=2"]), log=quiet)
    with torch.no_grad():
        trainer.model.norm.weight[0] = float("nan")
    checkpoint.save_dcp(step, trainer.model, trainer.optimizer)  # the same checkpoint, one weight NaN
    forge_integrity(step)  # as if it had been written that way: no file differs from its record
    trainer.release_run_dir()  # (the run directory's lock: the CLI run below is another process)
    result = run_cli("train", *common, "train.max_steps=8")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "NaN or infinite" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in checkpoint.complete_checkpoints(step.parent)] == ["step_0000002"]
