"""The loop's extension points: the hooks arrive in their documented order, a callback's state is saved in
checkpoints and handed back on resume, and the engines are what the loop talks to."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.train.callbacks import Callback
from pretrain.train.engines.plain import PlainEngine
from pretrain.train.trainer import Trainer


def quiet(*_a, **_k):
    pass


class Recorder(Callback):
    """Every hook call, and (as its checkpointed state) the steps it has seen over all runs so far."""

    state_key = "recorder"

    def __init__(self):
        self.calls: list[tuple] = []
        self.seen: list[int] = []
        self.loaded: dict | None = None

    def on_run_start(self, trainer):
        self.calls.append(("run_start", trainer.state["step"]))

    def on_step_start(self, trainer, step):
        self.calls.append(("step_start", step))

    def on_after_backward(self, trainer, step):
        grads = [p.grad for p in trainer.model.parameters()]
        self.calls.append(("after_backward", step, all(g is not None for g in grads)))

    def on_before_optimizer_step(self, trainer, step):
        self.calls.append(("before_optimizer_step", step))

    def on_step_end(self, trainer, step, loss, grad_norm):
        assert isinstance(loss, torch.Tensor) and isinstance(grad_norm, torch.Tensor)
        self.seen.append(step)
        self.calls.append(("step_end", step))

    def on_evaluate(self, trainer, step, val_loss):
        self.calls.append(("evaluate", step, val_loss > 0))

    def on_save_checkpoint(self, trainer, step, path):
        self.calls.append(("save", step, path.name))

    def on_load_checkpoint(self, trainer, step, path):
        self.calls.append(("load", step, path.name))

    def on_run_end(self, trainer):
        self.calls.append(("run_end", trainer.state["step"]))

    def state_dict(self) -> dict:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state
        self.seen = list(state["seen"])


def test_hooks_arrive_in_order_and_callback_state_survives_a_resume(tiny_cfg):
    steps = ["train.max_steps=6", "train.eval_interval=2", "checkpoint.interval=2", "train.log_interval=1"]
    first = Trainer(tiny_cfg(*steps, "train.stop_at_step=3"), log=quiet)
    assert isinstance(first.engine, PlainEngine) and first.model is first.engine.model
    recorder = Recorder()
    first.callbacks.append(recorder)
    first.fit()
    assert recorder.calls[:6] == [("run_start", 0), ("step_start", 1), ("after_backward", 1, True),
                                  ("before_optimizer_step", 1), ("step_end", 1), ("step_start", 2)]
    assert recorder.calls[6:12] == [("after_backward", 2, True), ("before_optimizer_step", 2), ("step_end", 2),
                                    ("evaluate", 2, True), ("save", 2, "step_0000002"), ("step_start", 3)]
    # stop_at_step: the run's last step is validated and saved, then the run ends
    assert recorder.calls[-4:] == [("step_end", 3), ("evaluate", 3, True), ("save", 3, "step_0000003"),
                                   ("run_end", 3)]

    second = Trainer(tiny_cfg(*steps), log=quiet)  # resumes from step 3 in the same run directory
    again = Recorder()
    second.callbacks.append(again)
    second.fit()
    assert again.loaded == {"seen": [1, 2, 3]}  # the state it had when the checkpoint was written
    assert again.calls[:2] == [("load", 3, "step_0000003"), ("run_start", 3)]
    assert again.seen == [1, 2, 3, 4, 5, 6]
    assert ("evaluate", 6, True) in again.calls and again.calls[-1] == ("run_end", 6)


def test_a_failing_step_reaches_on_error_and_closes_the_run(tiny_cfg):
    class Boom(Callback):
        def on_after_backward(self, trainer, step):
            if step == 2:
                raise RuntimeError("boom")

    class Seen(Callback):
        error: BaseException | None = None

        def on_error(self, trainer, error):
            self.error = error

    cfg = tiny_cfg("train.max_steps=4")
    trainer = Trainer(cfg, log=quiet)
    seen = Seen()
    trainer.callbacks += [Boom(), seen]
    try:
        trainer.fit()
    except RuntimeError as e:
        assert str(e) == "boom"
    else:
        raise AssertionError("the error was swallowed")
    assert isinstance(seen.error, RuntimeError)
    assert not (Path(cfg.train.run_dir) / "checkpoints").exists()  # no checkpoint of a failed step


def test_save_final_false_keeps_the_interval_and_a_signal_stop(tiny_cfg):
    """checkpoint.save_final=false: the interval's checkpoints only, not the schedule's end; a stop requested by a
    signal (the preemption handler's request_stop) is still saved."""

    class StopAt(Callback):
        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, trainer, step, loss, grad_norm):
            if step == self.step:
                trainer.request_stop()

    common = ["train.max_steps=5", "checkpoint.interval=2", "train.eval_interval=0", "checkpoint.save_final=false"]
    said: list[str] = []
    plain = Trainer(tiny_cfg(*common), log=lambda *a, **k: said.append(" ".join(map(str, a))))
    plain.fit()
    assert not [line for line in said if "writes no checkpoint" in line]  # (the interval saves steps 2 and 4)
    assert sorted(p.name for p in plain.ckpt_root.iterdir()) == ["step_0000002", "step_0000004"]
    assert plain.checkpointer.last.name == "step_0000004"
    stopped = Trainer(tiny_cfg(*common, "train.resume=never", f"train.run_dir={plain.run_dir}_stopped"), log=quiet)
    stopped.callbacks.append(StopAt(3))
    stopped.fit()
    assert sorted(p.name for p in stopped.ckpt_root.iterdir()) == ["step_0000002", "step_0000003"]
    nothing = Trainer(tiny_cfg(*common, "checkpoint.interval=0", f"train.run_dir={plain.run_dir}_none"),
                      log=lambda *a, **k: said.append(" ".join(map(str, a))))
    nothing.fit()
    assert not nothing.ckpt_root.exists() or not list(nothing.ckpt_root.iterdir())
    assert [line for line in said if "this run writes no checkpoint" in line]
