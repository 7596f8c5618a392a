"""Pipeline schedules on this machine: pp=2 (two processes, one thread each), gloo on CPU.

For every schedule and microbatch count, the real Trainer trains a model whose stages take long enough that
compute dominates the point-to-point traffic (an 8 x 512 Llama on random token ids), each in its own torchrun
launch, so that the CPU peak memory (the process's resident high-water mark) is this schedule's alone.
Every configuration runs ``--repeats`` times in round robin (this machine is shared, and a busy minute should
hit every schedule alike). Reported per configuration: median step time over the timed steps, the bubble fraction each rank measured (idle share
of its schedule wall time), each rank's peak memory, the mean F / I / W / B action times, and two theoretical
bubbles from replaying the same action order (``parallel/schedules.py``): with F = I = W (the zero-bubble
paper's assumption) and with the F / I / W times this run measured. Then the 2BP speed-up over 1F1B (and
GPipe) at equal microbatches, and pp 4 and 8 simulated with the measured F / I / W times (``deeper``). Timings
are reported, never asserted.

    python benchmarks/bench_pipeline.py --out pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "default": ["model.vocab_size=8192", "model.hidden_size=512", "model.num_layers=8", "model.num_heads=8",
                "model.ffn_hidden_size=1408", "data.seq_len=256", "data.micro_batch_size=1"],
    # seconds a launch: what the test suite runs so the benchmark does not rot (its timings mean nothing)
    "toy": ["model.vocab_size=640", "model.hidden_size=64", "model.num_layers=4", "model.num_heads=4",
            "model.ffn_hidden_size=128", "data.seq_len=32", "data.micro_batch_size=1"],
}
SCHEDULES = {  # name: overrides
    "1f1b": ["parallel.pp_schedule=1f1b"],
    "1f1b_2bp": ["parallel.pp_schedule=1f1b_2bp"],
    "1f1b_2bp_batched": ["parallel.pp_schedule=1f1b_2bp", "parallel.pp_batch_weight_grads=true"],
    "gpipe": ["parallel.pp_schedule=gpipe"],
    "gpipe_2bp": ["parallel.pp_schedule=gpipe_2bp"],
    "zero_bubble": ["parallel.pp_schedule=zero_bubble", "parallel.pp_virtual=2"],
    "zbv": ["parallel.pp_schedule=zbv", "parallel.pp_virtual=2"],
}


def worker(out: str, overrides: list[str], workdir: str) -> None:
    import torch.distributed as dist

    from pretrain.bench.harness import synthetic_dataset
    from pretrain.config import load_config
    from pretrain.train.trainer import Trainer

    cfg = load_config(None, [*overrides, f"data.blend=[{{path: {workdir}/random_ids}}]", "data.split=100,0,0",
                             f"tokenizer.path={workdir}/no_tokenizer.model"])
    if int(os.environ.get("RANK", 0)) == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        synthetic_dataset(Path(workdir) / "random_ids", cfg.model.vocab_size, cfg.data.seq_len, cfg.train.seed)
    dist.init_process_group("gloo")
    dist.barrier()
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    trainer.fit()
    trainer.metrics.close()
    if trainer.rank == 0:
        lines = (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()
        Path(out).write_text(json.dumps([r for r in map(json.loads, lines) if "loss" in r]))
    dist.destroy_process_group()


def summarize(repeats: list[list[dict]], schedule: list[str], microbatches: int, warmup: int) -> dict:
    """Medians over the timed steps of every repeat; peak memory: the highest any repeat reached."""
    from pretrain.parallel import schedules

    timed = [r for records in repeats for r in records if r["step"] > warmup]
    name = next(o.split("=")[1] for o in schedule if o.startswith("parallel.pp_schedule="))
    virtual = int(next((o.split("=")[1] for o in schedule if o.startswith("parallel.pp_virtual=")), 1))
    row: dict = {"step_time_s": statistics.median(r["step_time_s"] for r in timed)}
    for rank in (0, 1):
        row[f"bubble_rank{rank}"] = statistics.median(r[f"pp/bubble_fraction/rank{rank}"] for r in timed)
        row[f"peak_memory_mb_rank{rank}"] = max(records[-1][f"pp/peak_memory_mb/rank{rank}"] for records in repeats)
    row["bubble_measured"] = (row["bubble_rank0"] + row["bubble_rank1"]) / 2
    for kind in "fibw":
        values = [r[f"pp/{kind}_ms"] for r in timed if f"pp/{kind}_ms" in r]
        if values:
            row[f"{kind}_ms"] = statistics.median(values)
    order = schedules.compute_order(name, 2, microbatches, virtual)
    num_stages = 2 * schedules.stages_per_rank(name, virtual)
    row["bubble_theory"] = schedules.simulate(order, num_stages, {"F": 1.0, "I": 1.0, "W": 1.0}).bubble_fraction
    f = row["f_ms"]
    i, w = (row["i_ms"], row["w_ms"]) if "i_ms" in row else (row["b_ms"] / 2, row["b_ms"] / 2)
    row["bubble_sim_measured_costs"] = schedules.simulate(order, num_stages, {"F": f, "I": i, "W": w}).bubble_fraction
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="pipeline.json")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of every configuration, in round robin")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--model", default="default", choices=list(MODELS),
                        help="default: an 8 x 512 Llama; toy: 4 x 64, seconds a launch (for tests)")
    parser.add_argument("--worker", nargs=3, metavar=("OUT", "OVERRIDES_JSON", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], json.loads(args.worker[1]), args.worker[2])
        return
    model = MODELS[args.model]
    results: dict = {"model": model, "processes": 2, "threads_per_process": 1, "repeats": args.repeats, "runs": {}}
    records: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # round robin, so that a noisy minute hits every schedule alike
            for m in args.microbatches:
                for name in args.schedules:
                    key = f"{name}_m{m}"
                    out = Path(tmp) / f"{key}_{repeat}.json"
                    run = [*model, *SCHEDULES[name], "parallel.pp=2", f"data.global_batch_size={m}",
                           f"train.run_dir={tmp}/{key}_{repeat}", f"train.max_steps={args.steps}",
                           "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval=0",
                           "optim.warmup_steps=1", "logging.tensorboard=false", "logging.peak_tflops=1"]
                    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, "--worker", str(out), json.dumps(run), f"{tmp}/{key}_{repeat}_data"]
                    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
                    records.setdefault(key, []).append(json.loads(out.read_text()))
    for m in args.microbatches:
        for name in args.schedules:
            key = f"{name}_m{m}"
            row = summarize(records[key], SCHEDULES[name], m, args.warmup)
            results["runs"][key] = {"schedule": name, "microbatches": m, **row}
            print(f"{key:<22} step {row['step_time_s']:.3f} s  bubble {row['bubble_measured']:.3f} "
                  f"(theory {row['bubble_theory']:.3f})  peak MB {row['peak_memory_mb_rank0']:.0f}/"
                  f"{row['peak_memory_mb_rank1']:.0f}")
    runs = results["runs"]
    results["speedup"] = {}
    for m in args.microbatches:
        for split, whole in (("1f1b_2bp", "1f1b"), ("1f1b_2bp_batched", "1f1b"), ("gpipe_2bp", "gpipe")):
            if f"{split}_m{m}" in runs and f"{whole}_m{m}" in runs:
                results["speedup"][f"{split}_over_{whole}_m{m}"] = (
                    runs[f"{whole}_m{m}"]["step_time_s"] / runs[f"{split}_m{m}"]["step_time_s"])
    results["deeper"] = deeper(runs)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for key, value in results["speedup"].items():
        print(f"{key}: {value:.3f}x")
    for row in results["deeper"]:
        print(f"pp {row['pp']} m {row['microbatches']:>2} {row['schedule']:<17} bubble {row['bubble']:.3f}  "
              f"throughput {row['throughput_vs_1f1b']:.3f}x 1F1B")


def deeper(runs: dict) -> list[dict]:
    """pp 4 and 8 from the F, I, W milliseconds this run measured (the 2BP run with the most microbatches): the same
    model split into p x v stages, each stage's action time the measured one x 2 / (p v); the schedule simulator's
    bubble and throughput against 1F1B at 2p and 4p microbatches."""
    from pretrain.parallel import schedules

    measured = [r for r in runs.values() if "i_ms" in r and "w_ms" in r]
    if not measured:
        return []
    base = max(measured, key=lambda r: r["microbatches"])
    rows = []
    for pp in (4, 8):
        for micro in (2 * pp, 4 * pp):
            times = {}
            for name, virtual in (("1f1b", 1), ("1f1b_2bp", 1), ("interleaved_1f1b", 2), ("zbv", 2)):
                scale = 2 / (pp * virtual)
                cost = {"F": base["f_ms"] * scale, "I": base["i_ms"] * scale, "W": base["w_ms"] * scale}
                order = schedules.compute_order(name, pp, micro, virtual)
                t = schedules.simulate(order, pp * schedules.stages_per_rank(name, virtual), cost)
                times[name] = (t.makespan, t.bubble_fraction)
            for name, (makespan, bubble) in times.items():
                rows.append({"pp": pp, "microbatches": micro, "schedule": name, "bubble": bubble,
                             "makespan_ms": makespan, "throughput_vs_1f1b": times["1f1b"][0] / makespan})
    return rows


if __name__ == "__main__":
    main()
