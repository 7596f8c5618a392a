"""Forward+backward time of a SwiGLU FFN with dense and structured linears (docs/methods.md).

The kinds run in round robin (A B C ... A B C ..., ``pretrain.bench.harness``) in one process so that clock and
thermal drift hit all of them alike; the median over repeats after a warm-up is reported. Timings are
reported, never asserted.

    python benchmarks/bench_ffn.py --out ffn.json --hidden 512 --ffn 1376 --tokens 4096 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

from pretrain.bench.harness import environment, round_robin, write_json
from pretrain.device import autocast, resolve
from pretrain.models.ffn import FFN
from pretrain.models.structured import structured_linear


def variants(hidden: int) -> dict[str, dict]:
    """The kinds compared, at the paper's two budgets: rank hidden/2 and hidden/4, B = 2 and 4."""
    out: dict[str, dict] = {"dense": {"kind": "dense"}}
    for rank in (hidden // 2, hidden // 4):
        out[f"lowrank_r{rank}"] = {"kind": "lowrank", "rank": rank}
    for rank in (hidden // 2, hidden // 4):
        out[f"blockdense_b2_r{rank}"] = {"kind": "blockdense", "rank": rank, "blocks": 2}
    for blocks in (2, 4):
        out[f"blockshuffle_b{blocks}"] = {"kind": "blockshuffle", "blocks": blocks}
    return out


def build_ffn(spec: dict, hidden: int, ffn: int, device: torch.device, std: float = 0.02) -> FFN:
    options = dict(spec)
    linear = partial(structured_linear, options.pop("kind"), **options)  # kind is positional
    model = FFN(hidden, ffn, "swiglu", linear=linear).to(device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for proj in (model.gate_proj, model.up_proj, model.down_proj):
            if isinstance(proj, torch.nn.Linear):
                proj.weight.copy_(torch.empty(proj.weight.shape).normal_(0.0, std, generator=gen))
            else:
                proj.init_weights(gen, std)
    return model


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device, precision: str) -> None:
    """One forward and backward of ``model`` on ``x`` (gradients cleared first)."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    with autocast(device, precision):
        out = model(x)
    out.backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()

    device = resolve(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    models = {name: build_ffn(spec, args.hidden, args.ffn, device) for name, spec in variants(args.hidden).items()}
    x = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    grad = torch.randn(args.tokens, args.hidden, device=device)
    samples = round_robin({name: (lambda i, m=model: fwd_bwd(m, x, grad, device, args.precision))
                           for name, model in models.items()}, args.warmup + args.repeats, device)
    times = {name: [1e3 * s.seconds for s in runs[args.warmup:]] for name, runs in samples.items()}

    dense_ms = statistics.median(times["dense"])
    results = {}
    for name, model in models.items():
        ms = statistics.median(times[name])
        results[name] = {"params": sum(p.numel() for p in model.parameters()), "fwd_bwd_ms": round(ms, 3),
                         "ratio_vs_dense": round(ms / dense_ms, 3)}
    report = {**environment(device), "precision": args.precision, "hidden": args.hidden, "ffn": args.ffn,
              "tokens": args.tokens, "repeats": args.repeats, "results": results}
    write_json(report, args.out)

    dense_params = results["dense"]["params"]
    print(f"{'kind':<22}{'params':>10}{'of dense':>10}{'fwd+bwd ms':>12}{'vs dense':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['params']:>10}{r['params'] / dense_params:>10.2f}{r['fwd_bwd_ms']:>12.2f}"
              f"{r['ratio_vs_dense']:>10.2f}")


if __name__ == "__main__":
    main()
