"""The memory and time models against real runs on this machine (docs/planning.md): each layout trains a few
steps with the real Trainer, and every rank measures one step (the third: the optimizer state exists) as the
tensors it holds when the step starts (its weights, buffers and optimizer state, local shards) plus the highest
point the CPU allocator reaches above that during the step: the running sum of the allocations and frees the
torch profiler records (``profile_memory``). Beside it, the median time of the unprofiled steps; the caller puts
the predictions of ``pretrain plan`` next to both.

    python -m pretrain.plan.validate --out OUT --config CONFIG LAYOUTS_JSON   (or under torchrun: one group, many layouts)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

PROFILED_STEP = 3


def resident_bytes(model, optimizer) -> float:
    """Bytes of the distinct storages of the model's parameters and buffers and the optimizer's state (this rank's
    local shards of distributed tensors)."""
    import torch
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for state in optimizer.state.values():
        for t in state.values():
            add(t)
    return float(sum(seen.values()))


def allocation_peak(prof) -> float:
    """The highest running sum of the CPU allocations (positive) and frees (negative) the profile recorded."""
    from pretrain.torch_compat import profiled_cpu_allocations

    running = peak = 0
    for _, size in profiled_cpu_allocations(prof):
        running += size
        peak = max(peak, running)
    return float(peak)


def measure(overrides: list[str], config: str) -> dict:
    """Train the layout of ``config`` + ``overrides`` in this process (one rank of a group, or alone); return this
    rank's peak tensor memory in the profiled step, its step times and its pipeline rank."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from pretrain.config import load_config
    from pretrain.train.callbacks import Callback
    from pretrain.train.trainer import Trainer

    class Probe(Callback):
        def __init__(self):
            self.times, self.peak, self.t0, self.prof, self.resident = [], 0.0, 0.0, None, 0.0

        def on_step_start(self, trainer, step: int) -> None:
            if step == PROFILED_STEP:
                self.resident = resident_bytes(trainer.model, trainer.engine.optimizer)
                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self.prof.__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, trainer, step, loss, grad_norm) -> None:
            elapsed = time.perf_counter() - self.t0
            if step == PROFILED_STEP:
                self.prof.__exit__(None, None, None)
                self.peak = self.resident + allocation_peak(self.prof)
                self.prof = None
            else:
                self.times.append(elapsed)

    cfg = load_config(config or None, overrides)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    probe = Probe()
    trainer.callbacks.append(probe)
    trainer.fit()
    pp_rank = trainer.dims.pp_rank if trainer.dims.is_parallel else 0
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer.close()
    del trainer
    gc.collect()
    later = probe.times[1:] or probe.times  # (the first step creates the optimizer state)
    return {"rank": rank, "pp_rank": pp_rank, "peak_bytes": probe.peak, "step_s": statistics.median(later)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="each rank writes OUT.rankR")
    parser.add_argument("--config", default="", help="a run config (none: the overrides alone)")
    parser.add_argument("layouts", help="JSON: {name: [overrides]}")
    args = parser.parse_args()
    import torch.distributed as dist

    results = {name: measure(overrides, args.config) for name, overrides in json.loads(args.layouts).items()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(results))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_layouts(layouts: dict[str, list[str]], nproc: int, config: str, out: Path, threads: int) -> dict:
    """Measure ``layouts`` (each a list of overrides) in one launch of ``nproc`` processes; {name: [per rank]}."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    module = ["-m", "pretrain.plan.validate", "--out", str(out), "--config", config, json.dumps(layouts)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, *module]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measuring {list(layouts)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    per_rank = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]
    return {name: [ranks[name] for ranks in per_rank] for name in layouts}


if __name__ == "__main__":
    main()
