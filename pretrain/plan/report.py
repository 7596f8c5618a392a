"""`pretrain plan CONFIG --nodes N --gpus-per-node G --gpu h100 [--network ib400]`: the table of layouts that
fit, fastest first, the overrides of the best one, and the prediction for the config's own layout."""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

from pretrain.config import RunConfig, load_config
from pretrain.config.run import resolve
from pretrain.errors import UserError
from pretrain.paths import require_writable_file
from pretrain.plan import hardware
from pretrain.plan.memory import GiB, describe
from pretrain.plan.search import Candidate, evaluate, rank, why_no_layout
from pretrain.plan.timing import Cluster


def resolved_config(cfg: RunConfig, device_type: str) -> RunConfig:
    """The vocabulary size from the tokenizer when it is automatic, and a concrete precision."""
    from pretrain import device as devices

    if cfg.model.vocab_size == 0:
        from pretrain.data.tokenizer import Tokenizer, model_path

        path = model_path(cfg.tokenizer)
        if not path.is_file():
            raise UserError(f"model.vocab_size is 0 (the tokenizer's size) and the tokenizer {path} does not exist "
                            "yet; set model.vocab_size for the plan (e.g. model.vocab_size=128256).")
        cfg = resolve(cfg, Tokenizer(path).vocab_size)
    else:
        cfg = resolve(cfg, None)
    if cfg.train.precision == "auto":
        import torch

        precision = "bf16" if device_type == "cuda" else devices.resolve_precision("auto", torch.device("cpu"))[0]
        cfg = cfg.replace(train={"precision": precision})
    return cfg


def build_cluster(args) -> Cluster:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError("--nodes and --gpus-per-node must be at least 1.")
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        raise UserError(f"--efficiency {args.efficiency}: the achieved fraction of the matmul peak lies in (0, 1], "
                        "e.g. 0.45.")
    if args.intra_gbps is not None and not 0 < args.intra_gbps < math.inf:
        raise UserError(f"--intra-gbps {args.intra_gbps}: give the per-GPU bandwidth inside a node in GB/s, a positive "
                        "number such as 450 (default: the device's).")
    if args.gpu == "cpu":
        import torch

        from pretrain import device as devices

        threads = max(1, (os.cpu_count() or 1) // args.gpus_per_node)
        torch.set_num_threads(threads)
        peak = devices.measure_matmul_peak(torch.device("cpu"), torch.float32, seconds=0.5).tflops
        share = devices.available_memory_bytes(torch.device("cpu")) / args.gpus_per_node
        dev = hardware.cpu_device(threads, peak, share)
        if args.efficiency:
            dev = hardware.replace(dev, efficiency=args.efficiency)
        return Cluster(dev, args.nodes, args.gpus_per_node, args.intra_gbps or dev.intra_gbps)
    dev = hardware.get_device(args.gpu, args.efficiency)
    if args.intra_gbps:
        dev = hardware.replace(dev, intra_gbps=args.intra_gbps)
    return Cluster(dev, args.nodes, args.gpus_per_node, hardware.get_network(args.network))


def _line(c: Candidate) -> str:
    r = c.row()
    sched = f"{r['pp_schedule']}" + (f"/v{r['pp_virtual']}" if r["pp_virtual"] > 1 else "")
    return (f"{r['tp']:>3} {r['pp']:>3} {sched:<18} {r['dp_shard']:>5} {r['dp_replicate']:>5} {r['ep']:>3} "
            f"{r['activation_checkpointing']:<9} {r['micro_batch_size']:>3} {r['memory_gib_per_rank']:>9.2f} "
            f"{r['step_s']:>9.3f} {r['tokens_per_s']:>12,.0f} {100 * r['mfu']:>5.1f}% {100 * r['bubble']:>6.1f}% "
            f"{100 * r['comm_share']:>5.1f}%")


HEADER = (f"{'tp':>3} {'pp':>3} {'schedule':<18} {'shard':>5} {'repl':>5} {'ep':>3} {'ckpt':<9} {'mb':>3} "
          f"{'GiB/rank':>9} {'step s':>9} {'tokens/s':>12} {'MFU':>6} {'bubble':>7} {'comm':>6}")


def run(args) -> int:
    if args.top < 1:
        raise UserError(f"--top must be at least 1 (the rows of the table; default 10), got {args.top}.")
    if args.json:  # before the layouts are searched, not after
        require_writable_file(args.json, "--json")
    cluster = build_cluster(args)
    cfg = resolved_config(load_config(args.config, args.overrides), "cpu" if args.gpu == "cpu" else "cuda")
    micro = None
    if args.micro_batch_sizes:
        try:
            micro = [int(x) for x in args.micro_batch_sizes.split(",")]
        except ValueError:
            micro = []
        if not micro or min(micro) < 1:
            raise UserError(f"--micro-batch-sizes {args.micro_batch_sizes!r}: give positive integers separated by "
                            "commas, such as 1,2,4.")
    refused: Counter = Counter()
    ranked = rank(cfg, cluster, micro, progress=lambda n: print(f"  ... {n} layouts evaluated", file=sys.stderr,
                                                                 flush=True), refused=refused)
    if not ranked:
        raise UserError(why_no_layout(cfg, cluster, refused, micro))
    fit = [c for c in ranked if c.fits]
    dev = cluster.device
    usable = (dev.memory_bytes - dev.runtime_bytes) / GiB
    print(f"pretrain plan: {cfg.model.num_layers} x {cfg.model.hidden_size} model, "
          f"{cfg.data.global_batch_size} x {cfg.data.seq_len} tokens a step, {cfg.train.precision}, on "
          f"{cluster.nodes} x {cluster.gpus_per_node} {dev.name} ({usable:.1f} GiB for tensors per rank, "
          f"{dev.efficiency:.0%} of the matmul peak assumed)")
    own = None
    if cfg.parallel.world_size == cluster.world:
        own = evaluate(cfg, cluster)
        verdict = "fits" if own.fits else "does NOT fit"
        print(f"your layout: {own.memory.total / GiB:.2f} GiB on its fullest rank ({verdict}), "
              f"{own.time.tokens_per_s:,.0f} tokens/s predicted; {describe(own.memory.worst)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "device": dev.name,
                        "network_gbps": cluster.network_gbps, "efficiency": dev.efficiency},
            "own_layout": own.row() if own else None,
            "layouts": [c.row() for c in ranked]}, indent=1) + "\n")
    if not fit:
        smallest = ranked[0] if ranked else None
        detail = (f" The smallest is {smallest.memory.total / GiB:.1f} GiB per rank ({' '.join(smallest.overrides)}; "
                  f"{describe(smallest.memory.worst)}).") if smallest else ""
        raise UserError(f"no layout of this run fits {cluster.world} x {dev.name} ({usable:.1f} GiB for tensors "
                        f"per rank) among {len(ranked)} tried.{detail} Use more GPUs (--nodes), lower data.seq_len or "
                        "data.global_batch_size, or a smaller model."
                        + (f" Every layout tried, with its memory, is in {args.json}." if args.json else ""))
    print(f"\n{len(fit)} of {len(ranked)} layouts fit; the {min(args.top, len(fit))} fastest:")
    print(HEADER)
    for c in fit[:args.top]:
        print(_line(c))
    best = fit[0]
    print(f"\nbest: {best.time.tokens_per_s:,.0f} tokens/s, {best.memory.total / GiB:.2f} GiB per rank "
          f"({describe(best.memory.worst)})")
    print("overrides: " + " ".join(best.overrides))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    parser.add_argument("--gpu", default="h100", choices=[*hardware.DEVICES, "cpu"],
                        help="device: a known GPU, or cpu (this machine, its matmul rate measured)")
    parser.add_argument("--network", default="ib400", choices=list(hardware.NETWORKS),
                        help="per-GPU link between nodes (default ib400: 400 Gb/s InfiniBand)")
    parser.add_argument("--efficiency", type=float, help="achieved fraction of the matmul peak (default: the device's)")
    parser.add_argument("--intra-gbps", type=float, help="per-GPU bandwidth inside a node, GB/s (default: the device's)")
    parser.add_argument("--micro-batch-sizes", help="micro-batch sizes to try, e.g. 1,2,4 (default 1,2,4,8,16)")
    parser.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    parser.add_argument("--json", help="also write every layout tried, with its prediction, to this file")

