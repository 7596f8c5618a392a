"""Runs under torchrun for tests/test_distributed.py: each job trains one model kind under one parallel
layout with the real Trainer, records every parameter's full gradient after the first backward, and
trains on; rank 0 writes what the test compares. One process group serves every job of a launch."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pretrain.config import load_config
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


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    for job in jobs:
        cfg = load_config(None, job["overrides"])
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        if job.get("grads"):
            trainer.callbacks.append(CaptureGrads(Path(job["grads"])))
        trainer.fit()
        trainer.metrics.close()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
