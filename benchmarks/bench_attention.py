"""Exact causal attention kernels compared forward+backward, and the training step with each (issue #8).

Kernel part: the candidates for ``causal_attention`` (pretrain/models/attention.py) on q/k/v of one shape,
eager and under torch.compile, in the layout the model hands them over (a (batch, seq, heads, head_dim)
projection viewed as (batch, heads, seq, head_dim)), unless the name says otherwise:

* sdpa             ``scaled_dot_product_attention(is_causal=True)`` (on a CPU PyTorch's flash kernel)
* sdpa_contiguous  the same on contiguous (batch, heads, seq, head_dim) inputs
* sdpa_math        the same inside ``sdpa_kernel(SDPBackend.MATH)``
* full             masked softmax over the whole score matrix (``blocked_causal_attention``, one block)
* blocked_N        ``blocked_causal_attention`` with query blocks of N: each attends to its key prefix only
* flex             ``flex_attention`` with a causal ``create_block_mask``, compiled (forward only where its
                   backward is not implemented: CPU in torch 2.13)

Step part (``--step CONFIG``): two engines of the config, one whose attention runs SDPA and one the blocked
kernel, take optimizer steps alternately on the same random batches; MFU is against the matmul peak measured
before and after in the same process, as ``pretrain bench`` does.

Shared machines are noisy: the variants alternate (A B C ... A B C ...) and the best and the median of the
repeats are reported, with ratios to sdpa of the same mode. Timings are reported, never asserted.

    python benchmarks/bench_attention.py --precision bf16 --out attention.json
    python benchmarks/bench_attention.py --step configs/bench_small.yaml --repeats 6 --out attention_step.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.bench import matmul_peak_tflops, our_engine, synthetic_batches
from pretrain.bench.harness import environment, round_robin, write_json
from pretrain.config import load_config
from pretrain.device import resolve
from pretrain.models.attention import Attention, blocked_causal_attention
from pretrain.models.transformer import flops_per_token

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flex(seq: int, device: torch.device) -> Kernel:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seq, seq, device=device)
    return functools.partial(flex_attention, block_mask=mask)


def kernels(seq: int, device: torch.device) -> dict[str, Kernel]:
    out = {"sdpa": sdpa, "sdpa_contiguous": sdpa, "sdpa_math": sdpa_math,
           "full": functools.partial(blocked_causal_attention, block_size=seq)}
    for block in (64, 128, 256):
        out[f"blocked_{block}"] = functools.partial(blocked_causal_attention, block_size=block)
    return out


def fwd_bwd(kernel: Kernel, qkv: list[torch.Tensor], grad: torch.Tensor, backward: bool = True) -> None:
    for x in qkv:
        x.grad = None
    out = kernel(*qkv)
    if backward:
        out.backward(grad)


def kernel_part(args: argparse.Namespace, device: torch.device) -> dict:
    b, h, s, d = args.batch, args.heads, args.seq, args.head_dim
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    model_layout = [torch.randn(b, s, h, d, generator=gen).to(device, dtype).transpose(1, 2).requires_grad_()
                    for _ in range(3)]
    contiguous = [x.detach().contiguous().requires_grad_() for x in model_layout]
    grad = torch.randn(b, h, s, d, generator=gen).to(device, dtype)
    variants: dict[str, tuple[Kernel, list[torch.Tensor], bool]] = {}
    for mode in ("eager", "compiled"):
        for name, kernel in kernels(s, device).items():
            inputs = contiguous if name == "sdpa_contiguous" else model_layout
            variants[f"{name}/{mode}"] = (torch.compile(kernel) if mode == "compiled" else kernel, inputs, True)
    notes = {}
    flex_kernel = torch.compile(flex(s, device))
    try:
        fwd_bwd(flex_kernel, model_layout, grad)
        variants["flex/compiled"] = (flex_kernel, model_layout, True)
    except NotImplementedError as e:
        notes["flex"] = f"backward: {e}"
        frozen = [x.detach() for x in model_layout]  # flex refuses inputs that require grad on a CPU
        for name in ("flex", "sdpa", "blocked_128"):
            kernel = flex_kernel if name == "flex" else variants[f"{name}/compiled"][0]
            variants[f"{name}/compiled (forward only)"] = (kernel, frozen, False)

    samples = round_robin({name: (lambda i, v=v: fwd_bwd(v[0], v[1], grad, v[2])) for name, v in variants.items()},
                          args.warmup + args.repeats, device)
    times = {name: [s.seconds for s in runs[args.warmup:]] for name, runs in samples.items()}
    flops = 4 * b * h * s * s * d  # forward, causal-agnostic; backward twice that
    results = {}
    for name, t in times.items():
        base = min(times["sdpa/" + name.split("/")[1]])
        results[name] = {"best_ms": 1e3 * min(t), "median_ms": 1e3 * statistics.median(t),
                         "best_vs_sdpa": min(t) / base,
                         "tflops": (3 if "forward only" not in name else 1) * flops / min(t) / 1e12}
    print(f"{'variant':<32}{'best ms':>10}{'median ms':>11}{'vs sdpa':>9}{'TFLOP/s':>9}")
    for name, r in results.items():
        print(f"{name:<32}{r['best_ms']:>10.1f}{r['median_ms']:>11.1f}{r['best_vs_sdpa']:>9.2f}{r['tflops']:>9.3f}")
    for name, note in notes.items():
        print(f"{name}: {note}")
    return {"shape": [b, h, s, d], "precision": args.precision, "results": results, "notes": notes}


def step_part(args: argparse.Namespace, device: torch.device) -> dict:
    cfg = load_config(args.step, args.overrides)
    steps = args.warmup + args.repeats
    engines = {}
    for kernel in ("sdpa", "blocked"):
        engines[kernel] = our_engine(cfg)
        for module in engines[kernel].model.modules():
            if isinstance(module, Attention):
                module.kernel = kernel
    peak = matmul_peak_tflops(device, cfg.train.precision)
    batches = synthetic_batches(cfg, steps)

    def progress(i: int, name: str, sample) -> None:
        print(f"  step {i + 1}/{steps} {name:<8}{sample.seconds:7.3f} s  loss {sample.output:.4f}", flush=True)

    samples = round_robin({name: (lambda i, e=engine: float(e.train_step(batches[i])[0]))
                           for name, engine in engines.items()}, steps, device, progress)
    times = {name: [s.seconds for s in runs[args.warmup:]] for name, runs in samples.items()}
    losses = {name: [s.output for s in runs] for name, runs in samples.items()}
    peak = max(peak, matmul_peak_tflops(device, cfg.train.precision))
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    results = {name: {"median_s": statistics.median(t), "best_s": min(t),
                      "mfu_median": flops / statistics.median(t) / (peak * 1e12),
                      "mfu_best": flops / min(t) / (peak * 1e12), "losses": losses[name]}
               for name, t in times.items()}
    print(f"{'kernel':<10}{'median s':>10}{'best s':>9}{'MFU median':>12}{'MFU best':>10}")
    for name, r in results.items():
        print(f"{name:<10}{r['median_s']:>10.3f}{r['best_s']:>9.3f}{100 * r['mfu_median']:>11.1f}%"
              f"{100 * r['mfu_best']:>9.1f}%")
    ratio = results["blocked"]["best_s"] / results["sdpa"]["best_s"]
    print(f"matmul peak {peak:.3f} TFLOP/s ({cfg.train.precision}); blocked / sdpa step time, best steps: {ratio:.3f}")
    return {"config": args.step, "overrides": args.overrides, "peak_tflops": peak, "results": results,
            "blocked_over_sdpa_best": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--step", help="a config: compare whole training steps instead of the kernels")
    parser.add_argument("overrides", nargs="*", help="config overrides for --step (key=value)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()

    device = resolve(args.device)
    report = step_part(args, device) if args.step else kernel_part(args, device)
    write_json({**environment(device), **report}, args.out)


if __name__ == "__main__":
    main()
