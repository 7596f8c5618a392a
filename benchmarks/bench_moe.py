"""Forward+backward time of a MoE layer: grouped GEMM vs the per-expert loop (docs/methods.md).

Both paths run on the same module and weights, in round robin (grouped, loop, grouped, loop ...) in one
process so that clock and thermal drift hit both alike; the median over repeats after a warm-up is
reported. Timings are reported, never asserted.

    python benchmarks/bench_moe.py --out moe.json --hidden 256 --ffn 512 --experts 8 --top-k 2 --tokens 4096
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_ffn import fwd_bwd  # sibling script: the same forward+backward

from pretrain.bench.harness import environment, round_robin, write_json
from pretrain.config import ModelConfig, MoEConfig
from pretrain.device import resolve
from pretrain.models.moe import MoE, grouped_mm_works


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--capacity-factor", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()

    device = resolve(args.device)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      moe=MoEConfig(num_experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor))
    layer = MoE(cfg).to(device)
    layer.init_weights(torch.Generator().manual_seed(0), 0.02)
    x = torch.randn(1, args.tokens, args.hidden, device=device, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.hidden, device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    grouped_available = grouped_mm_works(device.type, dtype, args.hidden, args.ffn)

    def run(grouped: bool) -> None:
        layer.grouped = grouped and grouped_available  # else both variants loop
        fwd_bwd(layer, x, grad, device, args.precision)

    samples = round_robin({"grouped": lambda i: run(True), "loop": lambda i: run(False)}, args.warmup + args.repeats,
                          device)
    times = {name: [1e3 * s.seconds for s in runs[args.warmup:]] for name, runs in samples.items()}

    grouped_ms, loop_ms = statistics.median(times["grouped"]), statistics.median(times["loop"])
    report = {**environment(device), "precision": args.precision,
              "hidden": args.hidden, "ffn": args.ffn, "experts": args.experts, "top_k": args.top_k,
              "tokens": args.tokens, "capacity_factor": args.capacity_factor, "repeats": args.repeats,
              "grouped_mm_available": grouped_available, "grouped_ms": round(grouped_ms, 3),
              "loop_ms": round(loop_ms, 3), "speedup": round(loop_ms / grouped_ms, 3)}
    write_json(report, args.out)

    print(f"MoE d={args.hidden} f={args.ffn} E={args.experts} k={args.top_k} T={args.tokens} "
          f"{args.precision} on {device} (grouped_mm available: {grouped_available})")
    print(f"{'path':<10}{'fwd+bwd ms':>12}")
    print(f"{'grouped':<10}{grouped_ms:>12.2f}\n{'loop':<10}{loop_ms:>12.2f}\nspeedup (loop / grouped): "
          f"{report['speedup']:.2f}x")


if __name__ == "__main__":
    main()
