"""The loop's own callbacks: the progress line and metrics record of each log interval, validation, checkpoints
and the profiler. The loop (``trainer.py``) adds them to every run; they talk to it only through the hooks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pretrain import device as devices
from pretrain.parallel.plan import all_reduce_sum
from pretrain.train.callbacks import Callback
from pretrain.train.metrics import console_line

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer


class ProgressLogger(Callback):
    """Every ``train.log_interval`` steps and at the last one: the mean loss over the interval (summed over the
    data-parallel ranks), lr, gradient norm, tokens/s and MFU, plus every callback's and the engine's metrics,
    to metrics.jsonl, tensorboard and the console. Time spent in validation and checkpoints is not training
    time: the interval's clock restarts after them. The loss is read only here, so steps never sync."""

    def __init__(self):
        self.loss_sum: torch.Tensor | None = None
        self.steps = 0
        self.started = time.perf_counter()

    def on_run_start(self, trainer: Trainer) -> None:
        self.loss_sum = torch.zeros((), device=trainer.device)
        self.steps, self.started = 0, time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1
        if step % trainer.cfg.train.log_interval and not trainer.is_final_step:
            return
        devices.synchronize(trainer.device)
        elapsed = time.perf_counter() - self.started
        tokens_per_step = trainer.cfg.data.tokens_per_step
        tps = self.steps * tokens_per_step / elapsed
        all_reduce_sum(self.loss_sum, trainer.dims)
        rec = {"step": step, "consumed_samples": trainer.state["consumed_samples"], "loss": float(self.loss_sum) / self.steps,
               "lr": trainer.engine.optimizer.param_groups[0]["lr"], "tokens": trainer.state["tokens"],
               "flops": trainer.state["flops"],
               "tokens_per_s": tps, "grad_norm": float(grad_norm),
               "mfu": tps * trainer.flops_per_token / (trainer.peak_tflops * 1e12), "step_time_s": elapsed / self.steps}
        for callback in trainer.callbacks:
            rec.update(callback.metrics(trainer, step))
        rec.update(trainer.engine.metrics())
        trainer.metrics.log(rec)
        eta = (trainer.last_step - step) * elapsed / self.steps
        trainer.log(console_line(rec, trainer.total_steps, eta))
        self.loss_sum.zero_()
        self.steps, self.started = 0, time.perf_counter()

    def on_evaluate(self, trainer: Trainer, step: int, val_loss: float) -> None:
        self.started = time.perf_counter()

    def on_save_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        self.started = time.perf_counter()

    def on_load_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        self.started = time.perf_counter()  # (a growth between two steps, or a rollback)


class Evaluator(Callback):
    """The validation loss every ``train.eval_interval`` steps and at the end of the schedule."""

    def __init__(self):
        self.last: float | None = None

    def on_run_start(self, trainer: Trainer) -> None:
        if trainer.cfg.train.eval_interval and trainer.valid_batches is None:
            trainer.log(f"warning: train.eval_interval={trainer.cfg.train.eval_interval}, but the data has no "
                        f"validation split (data.split={trainer.cfg.data.split}), so no "
                        "val_loss will be logged; give validation a share (e.g. data.split=98,2,0) or set "
                        "train.eval_interval=0.")

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        interval = trainer.cfg.train.eval_interval
        if (interval and step % interval == 0) or step == trainer.last_step:
            trainer.enter(f"validation after step {step}")
            self.last = trainer.evaluate()
            if self.last is not None:
                trainer.metrics.log({"step": step, "val_loss": self.last, "tokens": trainer.state["tokens"],
                                     "flops": trainer.state["flops"]})
                trainer.log(f"step {step:>6}/{trainer.total_steps} | val_loss {self.last:.4f}")
                trainer.callbacks_call("on_evaluate", step, self.last)


class Checkpointer(Callback):
    """A checkpoint every ``checkpoint.interval`` steps, after a growth stage's last step and after a signal's stop;
    after the run's last step (the schedule's end, or train.stop_at_step) unless ``checkpoint.save_final`` is false."""

    def __init__(self):
        self.last: Path | None = None

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        interval = trainer.cfg.checkpoint.interval
        final = trainer.is_final_step and (trainer.cfg.checkpoint.save_final or trainer.stop_requested)
        if (interval and step % interval == 0) or final or trainer.stage_ends:
            trainer.enter(f"the checkpoint of step {step}")
            path = trainer.save_checkpoint()
            if path is not None:
                self.last = path
                trainer.log(f"checkpoint -> {path}")
                trainer.callbacks_call("on_save_checkpoint", step, path)


class Profiler(Callback):
    """``torch.profiler`` over a few optimizer steps (``train.profile``): 1 skipped, 1 warm-up, then
    ``train.profile_steps`` recorded. The trace goes to ``RUN_DIR/profile`` (tensorboard's profile plugin, or
    Perfetto, opens it); a run that ends inside the recorded window writes what it has."""

    def __init__(self):
        self.prof = None

    def on_run_start(self, trainer: Trainer) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        cuda = trainer.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        once = schedule(wait=1, warmup=1, active=trainer.cfg.train.profile_steps, repeat=1)  # repeat=0 cycles
        trace = tensorboard_trace_handler(str(trainer.run_dir / "profile"), f"rank{trainer.rank}")
        self.prof = profile(activities=activities, schedule=once, on_trace_ready=trace, record_shapes=True,
                            profile_memory=True, acc_events=True)
        self.prof.start()

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.prof.step()

    def on_run_end(self, trainer: Trainer) -> None:
        self._stop()

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
