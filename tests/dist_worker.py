"""Runs as each process of a launch (tests/conftest.py::launch_jobs) for the layout tests: one process group serves
every job of a launch, and each job trains with the real Trainer under one parallel layout. A job may
* record every parameter's full gradient after the first backward (``grads``): rank 0 writes them, or with
  ``per_rank`` every rank writes those it holds (its pipeline stages');
* watch every compute action of a pipeline schedule (``probe``): its matmul FLOPs by kind (F, B, I, W), whether
  an input-backward action changed any parameter's ``.grad``, and how many checkpointed forwards still hold
  their saved activations after the run;
* write each rank's end-of-run sample of ``train.sample_prompt`` (``sample``).
The jobs no test resumes set ``checkpoint.save_final=false``: a second or so of collectives and writes fewer each."""

import gc
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from pretrain.config import RunConfig, load_config
from pretrain.parallel.pipeline import Stage
from pretrain.parallel.retained_checkpoint import _SavedActivations
from pretrain.train.callbacks import Callback
from pretrain.train.trainer import Trainer


class CaptureGrads(Callback):
    """Every parameter's full gradient after the first backward, under its global name: rank 0 writes them to
    ``path``, or with ``per_rank`` every rank writes its own (its pipeline stages') to ``path.rankR.pt``."""

    def __init__(self, path: Path | str, per_rank: bool = False):
        self.path, self.per_rank = path, per_rank

    def on_after_backward(self, trainer, step: int) -> None:
        if step != 1:
            return
        grads = {}
        for name, p in trainer.model.named_parameters():
            g = p.grad
            grads[name] = None if g is None else (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
        if self.per_rank:
            torch.save(grads, f"{self.path}.rank{dist.get_rank()}.pt")
        elif trainer.rank == 0:
            torch.save(grads, self.path)


def train_capturing(cfg: RunConfig, grads: Path | str | None = None, per_rank: bool = False) -> Trainer:
    """Train ``cfg`` with the real Trainer (in the calling process: the single-process references, or one
    rank of a job), capturing the first backward's gradients to ``grads`` when given."""
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    if grads:
        trainer.callbacks.append(CaptureGrads(grads, per_rank))
    trainer.fit()
    trainer.metrics.close()
    return trainer


@register_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """The grouped GEMM of the MoE experts (FlopCounterMode has no formula for it): every row of ``a`` meets
    one group's matrix, (T, K) x (G, K, N) forward and input gradient, (N, T) x (T, K) weight gradient."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


class ActionProbe:
    """Wraps the stage's compute actions: counts FLOPs per kind and compares every parameter's ``.grad``
    before and after each input-backward action."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.flops: dict[str, int] = defaultdict(int)
        self.inputs_checked = 0
        self.changed: list[str] = []
        self.originals = {name: getattr(Stage, name) for name in
                          ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")}

    def install(self) -> None:
        probe = self

        def counted(kind_of, original):
            def run(stage, *args, **kwargs):
                kind = kind_of(*args, **kwargs)
                before = probe.snapshot() if kind == "I" else None
                with FlopCounterMode(display=False) as counter:
                    out = original(stage, *args, **kwargs)
                probe.flops[kind] += counter.get_total_flops()
                if before is not None:
                    probe.inputs_checked += 1
                    after = probe.snapshot()
                    probe.changed += [n for n in before if not _same(before[n], after[n])]
                return out
            return run

        Stage.forward_one_chunk = counted(lambda *a, **k: "F", self.originals["forward_one_chunk"])
        Stage.backward_one_chunk = counted(
            lambda chunk, loss=None, full_backward=True, last_backward=False: "B" if full_backward else "I",
            self.originals["backward_one_chunk"])
        Stage.backward_weight_one_chunk = counted(lambda *a, **k: "W", self.originals["backward_weight_one_chunk"])

    def remove(self) -> None:
        for name, method in self.originals.items():
            setattr(Stage, name, method)

    def snapshot(self) -> dict:
        return {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.trainer.model.named_parameters()}


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    for job in jobs:
        cfg = load_config(None, job["overrides"])
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        if job.get("grads"):
            trainer.callbacks.append(CaptureGrads(job["grads"], per_rank=job.get("per_rank", False)))
        probe = ActionProbe(trainer) if job.get("probe") else None
        if probe:
            probe.install()
        try:
            trainer.fit()
        finally:
            if probe:
                probe.remove()
        trainer.metrics.close()
        if job.get("sample"):
            text = trainer.sample(cfg.train.sample_prompt, cfg.train.sample_tokens)
            Path(f"{job['sample']}.rank{dist.get_rank()}.txt").write_text(text)
        if probe:
            gc.collect()  # earlier jobs' trainers
            Path(f"{job['probe']}.rank{dist.get_rank()}.json").write_text(json.dumps(
                {"flops": probe.flops, "inputs_checked": probe.inputs_checked, "changed": probe.changed,
                 "checkpointed_forwards_alive": sum(isinstance(o, _SavedActivations) for o in gc.get_objects())}))
        dist.barrier()
    del trainer, probe  # freed while the interpreter is whole, as run_training does
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
