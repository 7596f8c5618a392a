"""Step time and memory per rank of DeepSpeed's ZeRO stages (with and without CPU offload) beside our FSDP2 and
DDP, on the same model in one run: every variant trains through the real Trainer under torchrun.

Memory per rank: on a GPU the peak the step allocates (``torch.cuda.max_memory_allocated``); on a CPU, which has no
allocator statistics, the tensors alive on the rank after its last step (each storage once: weights, gradients,
optimizer state and DeepSpeed's buffers, the part ZeRO partitions) and the process's resident-set peak (everything
it ever held, the Python and library code included). Timings are reported, never asserted.

    python benchmarks/bench_zero.py --out zero.json                  # 2 processes on this machine's CPU
    python benchmarks/bench_zero.py --nproc 1 --shape gpu --out zero_gpu.json   # one GPU: the stages in one process
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # a 17M model in fp32 for 2 CPU processes; a 0.8B one in bf16 autocast for a GPU
    "cpu": ["model.hidden_size=512", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=8",
            "model.ffn_hidden_size=1408", "data.seq_len=256", "data.micro_batch_size=4", "train.precision=fp32"],
    "gpu": ["model.hidden_size=2048", "model.num_layers=12", "model.num_heads=16", "model.num_kv_heads=8",
            "model.ffn_hidden_size=5632", "data.seq_len=2048", "data.micro_batch_size=4", "train.precision=bf16",
            "optim.impl=fused"],
}
DS = ["parallel.engine=deepspeed"]
VARIANTS = {  # name: overrides (the data-parallel size is added)
    "ddp": ["parallel.dp_replicate={n}"],
    "fsdp2": ["parallel.dp_shard={n}"],
    "zero1": [*DS, "parallel.dp_shard={n}", "parallel.zero_stage=1"],
    "zero2": [*DS, "parallel.dp_shard={n}", "parallel.zero_stage=2"],
    "zero3": [*DS, "parallel.dp_shard={n}", "parallel.zero_stage=3"],
    "zero2_offload": [*DS, "parallel.dp_shard={n}", "parallel.zero_stage=2", "parallel.offload_optimizer=true"],
    "zero3_offload": [*DS, "parallel.dp_shard={n}", "parallel.zero_stage=3", "parallel.offload_optimizer=true",
                      "parallel.offload_params=true"],
}


def live_tensor_mb() -> float:
    """Tensors alive in this process, each storage counted once (CPU and GPU)."""
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return total / 2**20


def worker(out: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    from pretrain import device as devices
    from pretrain.config import load_config
    from pretrain.train.trainer import Trainer

    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    devices.reset_peak_memory(trainer.device)
    trainer.fit()
    gc.collect()
    result = {"rank": trainer.rank, "tensors_mb": live_tensor_mb(), "peak_mb": devices.peak_memory_mb(trainer.device),
              "device": devices.device_name(trainer.device)}
    if trainer.rank == 0:
        records = [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time_s"] for r in records if "step_time_s" in r][2:]  # after the first steps' warm-up
        result |= {"step_time_s": statistics.median(times),
                   "tokens_per_s": statistics.median([r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]),
                   "losses": [r["loss"] for r in records if "loss" in r]}
    Path(f"{out}.rank{trainer.rank}.json").write_text(json.dumps(result))
    trainer.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="zero.json")
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel processes (1 on a single GPU)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--shape", choices=list(SHAPES), default="cpu")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--worker", nargs=2, metavar=("OUT", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], json.loads(args.worker[1]))
        return
    n = args.nproc
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or VARIANTS:
            if n == 1 and name == "ddp":
                continue  # (the same as fsdp2 in one process)
            print(f"{name} ...", flush=True)  # (each variant starts its own processes: a few seconds each)
            out = Path(tmp) / name
            run = [*SHAPES[args.shape], *(o.format(n=n) for o in VARIANTS[name]), f"data.global_batch_size={4 * n * 2}",
                   f"train.run_dir={tmp}/{name}", f"train.max_steps={args.steps}", "train.log_interval=1",
                   "train.eval_interval=0", "checkpoint.interval=0", "optim.warmup_steps=1", "train.sample_tokens=0",
                   "logging.tensorboard=false"]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, "--worker", str(out), json.dumps(run)]
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(n)]
            results[name] = {**ranks[0], "tensors_mb_per_rank": [r["tensors_mb"] for r in ranks],
                             "peak_mb_per_rank": [r["peak_mb"] for r in ranks]}
            print(f"  {results[name]['step_time_s']:.3f} s/step, peak {max(results[name]['peak_mb_per_rank']):.0f} MB "
                  f"per rank", flush=True)
            Path(args.out).write_text(json.dumps({"processes": n, "shape": args.shape, "variants": results}) + "\n")
    base = results["fsdp2"]["step_time_s"]
    for r in results.values():
        r["step_time_vs_fsdp2"] = r["step_time_s"] / base
    Path(args.out).write_text(json.dumps({"processes": n, "shape": args.shape, "model": SHAPES[args.shape],
                                          "variants": results}, indent=1) + "\n")
    print(f"{results['fsdp2']['device']}, {n} process(es)")
    print(f"{'variant':<14} {'step s':>8} {'vs fsdp2':>8} {'tensors MB/rank':>16} {'peak MB/rank':>13}")
    for name, r in results.items():
        print(f"{name:<14} {r['step_time_s']:>8.3f} {r['step_time_vs_fsdp2']:>8.2f} "
              f"{max(r['tensors_mb_per_rank']):>16.0f} {max(r['peak_mb_per_rank']):>13.0f}")


if __name__ == "__main__":
    main()
