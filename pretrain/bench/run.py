"""`pretrain bench CONFIG`: training throughput of our engine, and with ``--against hf`` of the Hugging Face
``transformers`` model of the same shape, measured side by side in one process.

Shared machines are noisy, so every figure is a ratio taken in the same run: the two variants alternate
step by step (ours, hf, ours, hf, ...) on the same synthetic batches (uniform random token ids of the
config's shape; no tokenizer or data needed, ``model.vocab_size`` must be set), and MFU divides by a matmul
peak measured on the spot for the precision in use (and, on a known GPU, by the datasheet peak too).

* ours: the engine ``pretrain train`` builds for the config (model, activation checkpointing, compile, AdamW
  kernels, autocast as configured), taking its real ``train_step``.
* hf: ``LlamaForCausalLM`` / ``MixtralForCausalLM`` of the same shape (random init, SDPA attention, eager),
  trained by the same engine (``hf_reference.py``): the same loss on its logits (labels shifted in the data,
  logits never sliced), token weighting, accumulation, clipping and AdamW; Mixtral's balance loss included.

Peak memory, over the timed steps: on a GPU each variant's own (its weights, gradients and optimizer state plus
the peak its step allocates above everything resident; both variants live on the device at once); on a CPU
only the process-wide resident high-water mark exists, which the two variants share.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain import device as devices
from pretrain.bench.harness import environment, matmul_peak_tflops, round_robin, summarize, synthetic_batches
from pretrain.config import RunConfig
from pretrain.data.loader import MicroBatch
from pretrain.errors import UserError
from pretrain.models.transformer import flops_per_token
from pretrain.parallel import mesh
from pretrain.train.engines import Engine, build_engine

Step = Callable[[list[MicroBatch]], torch.Tensor]
PROFILE_STEPS = 2  # `--profile`: steps of each variant profiled after the timed ones


def our_engine(cfg: RunConfig) -> Engine:
    """The engine ``pretrain train`` builds for ``cfg`` (one process), its model in training mode."""
    dims, device = mesh.setup(cfg.parallel, devices.resolve(cfg.train.device))
    devices.retain_host_memory(device)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, dims, device)
    engine.model.train()
    return engine


def hf_engine(cfg: RunConfig, device: torch.device, precision: str) -> Engine:
    """Our plain engine training the transformers model of the same shape, eager, without recomputation."""
    from pretrain.bench.hf_reference import hf_model
    from pretrain.train.engines.plain import PlainEngine

    hf_cfg = cfg.replace(train={"precision": precision, "compile": False, "activation_checkpointing": "none"})
    dims, _ = mesh.setup(hf_cfg.parallel, device)
    return PlainEngine(hf_cfg, dims, device, model=hf_model(hf_cfg, device))


def resident_mb(*holders: torch.nn.Module | torch.optim.Optimizer) -> float:
    """Memory of the distinct tensors that modules (parameters, buffers) and optimizers (state) keep between
    steps, counted by storage so that shared and tied tensors count once."""
    storages: dict[int, int] = {}
    for holder in holders:
        if isinstance(holder, torch.nn.Module):
            tensors = [*holder.parameters(), *holder.buffers()]
        else:
            tensors = [v for state in holder.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            t = t.to_local() if hasattr(t, "to_local") else t
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) / 2**20


def _summary(times: list[float], losses: list[float], mems: list[float], tokens_per_step: int, flops: float,
             peak: float, datasheet: float | None) -> dict:
    step_time = summarize(times)
    tps = tokens_per_step / step_time["median"]
    out = {"tokens_per_s": tps, "tflops": tps * flops / 1e12, "mfu": tps * flops / (peak * 1e12),
           "peak_mem_mb": max(mems), "step_time_s": step_time, "loss_first": losses[0], "loss_last": losses[-1]}
    if datasheet is not None:
        out["mfu_datasheet"] = tps * flops / (datasheet * 1e12)
    return out


def profile_steps(variants: dict[str, Step], batches: list[list[MicroBatch]], device: torch.device,
                  out_dir: Path, log=print) -> dict[str, dict]:
    """Each variant's ``len(batches)`` further steps under ``torch.profiler``: a Chrome/Perfetto trace per variant
    in ``out_dir`` and where the time went, which is printed and returned. On a GPU that is the kernels (read
    from the trace, so that an operator and the kernels it launched are not counted twice) and the share of
    the wall time the GPU was busy; on a CPU the operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, step in variants.items():
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for micro_batches in batches:
                step(micro_batches)
            devices.synchronize(device)
            wall = time.perf_counter() - t0
        trace = out_dir / f"{name}.trace.json"
        prof.export_chrome_trace(str(trace))
        totals: dict[str, list[float]] = {}  # name -> [calls, microseconds]
        if gpu:
            for event in json.loads(trace.read_text())["traceEvents"]:
                if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
                    row = totals.setdefault(event["name"], [0, 0.0])
                    row[0], row[1] = row[0] + 1, row[1] + event.get("dur", 0.0)
        else:
            totals = {e.key: [e.count, e.self_cpu_time_total] for e in prof.key_averages()}
        busy = sum(us for _, us in totals.values())
        top = sorted(totals.items(), key=lambda kv: kv[1][1], reverse=True)[:25]
        result[name] = {
            "wall_ms_per_step": 1e3 * wall / len(batches),
            "busy_ms_per_step": busy / 1e3 / len(batches),
            "top": [{"name": k[:200], "calls": int(n), "ms_per_step": us / 1e3 / len(batches), "share": us / (busy or 1.0)}
                    for k, (n, us) in top]}
        what = "GPU kernels" if gpu else "CPU operators (self time)"
        log(f"{name}: {what}, per step: {result[name]['busy_ms_per_step']:.1f} ms busy in "
            f"{result[name]['wall_ms_per_step']:.1f} ms wall (profiled; trace {trace})")
        for row in result[name]["top"][:12]:
            log(f"  {100 * row['share']:5.1f}%  {row['ms_per_step']:8.2f} ms  {row['calls'] // len(batches):>5}x  "
                f"{row['name'][:100]}")
    return result


def run_bench(cfg: RunConfig, *, against: str | None = None, steps: int = 10, warmup: int = 3,
              hf_precision: str = "same", profile_dir: str | Path | None = None, log=print) -> dict:
    """Measure, print a table through ``log`` and return the figures (see the module docstring)."""
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be at least 1 and --warmup at least 0, got {steps} and {warmup}.")
    if cfg.model.vocab_size <= 0:
        raise UserError("pretrain bench uses random token ids and no tokenizer: set model.vocab_size.")
    if cfg.parallel.world_size > 1:
        raise UserError("pretrain bench runs one process; set parallel.dp_replicate, dp_shard, tp, ep and pp to 1.")
    d = cfg.data  # every step's batch is made up front: ids and labels (int64) and weights (fp32) per token
    batches_bytes = (warmup + steps) * d.global_batch_size * d.seq_len * 20
    if batches_bytes > devices.available_memory_bytes(torch.device("cpu")) / 2:
        raise UserError(f"--steps {steps} and --warmup {warmup}: their synthetic batches alone take "
                        f"{batches_bytes / 2**30:.1f} GiB, more than half the memory available; time fewer steps "
                        "(a few dozen give a steady median).")
    resolved, note = devices.resolve_precision(cfg.train.precision, devices.resolve(cfg.train.device))
    if note:
        log(note)
    cfg = cfg.replace(train={"precision": resolved})
    precision = {"ours": resolved, "hf": resolved if hf_precision == "same" else hf_precision}
    names = ["ours"] + (["hf"] if against == "hf" else [])
    log(f"building {' and '.join(names)} ({', '.join(f'{n} {precision[n]}' for n in names)}) ...")
    engines = {"ours": our_engine(cfg)}
    device = engines["ours"].device
    if against == "hf":
        engines["hf"] = hf_engine(cfg, device, precision["hf"])
    variants: dict[str, Step] = {name: (lambda mbs, e=engine: e.train_step(mbs)[0]) for name, engine in engines.items()}
    kinds = sorted(set(precision[n] for n in names))
    log(f"measuring the {' and '.join(kinds)} matmul peak (about 1.5 s each, before and after the steps) ...")
    peaks = {p: matmul_peak_tflops(device, p) for p in kinds}
    log(f"timing {warmup} warm-up and {steps} measured steps of {' and '.join(names)}, interleaved ...")
    batches = synthetic_batches(cfg, warmup + steps)
    def progress(i: int, name: str, sample) -> None:
        log(f"  step {i + 1:>3}/{warmup + steps} {name:<4} {sample.seconds:7.3f} s  loss {sample.output:.4f}"
            + ("  (warm-up)" if i < warmup else ""))

    samples = round_robin({name: (lambda i, step=step: float(step(batches[i]))) for name, step in variants.items()},
                          warmup + steps, device, progress)
    peaks = {p: max(peaks[p], matmul_peak_tflops(device, p)) for p in peaks}  # again after: noisy machines
    profiled = batches[-PROFILE_STEPS:]  # the last batches again (fewer when the run has fewer)
    tops = profile_steps(variants, profiled, device, Path(profile_dir), log) if profile_dir else None
    d = cfg.data
    flops = flops_per_token(cfg.model, d.seq_len)
    result = {
        **environment(device), "steps": steps, "warmup": warmup,
        "shape": {"vocab_size": cfg.model.vocab_size, "hidden_size": cfg.model.hidden_size,
                  "num_layers": cfg.model.num_layers, "num_heads": cfg.model.num_heads,
                  "num_kv_heads": cfg.model.kv_heads, "ffn_hidden_size": cfg.model.ffn_size,
                  "num_experts": cfg.model.moe.num_experts, "top_k": cfg.model.moe.top_k, "seq_len": d.seq_len,
                  "micro_batch_size": d.micro_batch_size, "global_batch_size": d.global_batch_size},
        "settings": {"precision": precision, "compile": {"ours": cfg.train.compile, "hf": False},
                     "activation_checkpointing": cfg.train.activation_checkpointing, "optim_impl": cfg.optim.impl},
        "tokens_per_step": d.tokens_per_step, "flops_per_token": flops,
        "peak_tflops_measured": peaks,
        "peak_mem_scope": "per variant: its resident tensors + its step's peak above all resident (GPU allocator)"
                          if device.type == "cuda" else
                          "process-wide resident high-water mark (ru_maxrss), shared by both variants on CPU",
    }
    for name in names:
        timed = samples[name][warmup:]  # the steady state: compilation's and the first step's allocations left out
        # On a GPU: the variant's own resident tensors plus what its step allocated on top of all that was
        # resident, so that the other variant's weights and optimizer state don't count.
        own = resident_mb(engines[name].model, engines[name].optimizer)
        mems = [s.peak_mb - s.held_mb + own if device.type == "cuda" else s.peak_mb for s in timed]
        result[name] = _summary([s.seconds for s in timed], [s.output for s in samples[name]], mems,
                                d.tokens_per_step, flops, peaks[precision[name]],
                                devices.datasheet_tflops(device, precision[name]))
    if tops is not None:
        result["profile"] = {"dir": str(profile_dir), "steps": len(profiled), **tops}
    if "hf" in engines:
        import transformers

        hf = engines["hf"].model.hf
        result["hf"].update({"model_class": type(hf).__name__, "transformers": transformers.__version__,
                             "attn_implementation": hf.config._attn_implementation,
                             "loss": "lm_loss_sum on the HF logits with pre-shifted labels (no logits slicing)"})
        if cfg.model.moe.num_experts:
            # transformers >= 5 picks an experts kernel (eager loop, grouped_mm, ...); 4.x always loops
            result["hf"]["experts_implementation"] = getattr(hf.config, "_experts_implementation", "eager loop")
        result["speedup"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
        # Noise only ever adds time: the ratio of the fastest steps is the least disturbed view.
        result["speedup_fastest_steps"] = result["hf"]["step_time_s"]["min"] / result["ours"]["step_time_s"]["min"]
    log(format_table(result))
    return result


def format_table(result: dict) -> str:
    names = [n for n in ("ours", "hf") if n in result]
    rows = [("precision", lambda n: result["settings"]["precision"][n]),
            ("tokens/s", lambda n: f"{result[n]['tokens_per_s']:,.0f}"),
            ("TFLOP/s", lambda n: f"{result[n]['tflops']:.3f}"),
            ("MFU (measured peak)", lambda n: f"{100 * result[n]['mfu']:.1f}%"),
            ("step time median s", lambda n: f"{result[n]['step_time_s']['median']:.3f}"),
            ("step time p10-p90 s", lambda n: f"{result[n]['step_time_s']['p10']:.3f}-{result[n]['step_time_s']['p90']:.3f}"),
            ("peak memory MB", lambda n: f"{result[n]['peak_mem_mb']:,.0f}"),
            ("loss first -> last", lambda n: f"{result[n]['loss_first']:.3f} -> {result[n]['loss_last']:.3f}")]
    if "mfu_datasheet" in result["ours"]:
        rows.insert(4, ("MFU (datasheet)", lambda n: f"{100 * result[n]['mfu_datasheet']:.1f}%"))
    lines = [f"{'':<22}" + "".join(f"{n:>20}" for n in names)]
    lines += [f"{label:<22}" + "".join(f"{fmt(n):>20}" for n in names) for label, fmt in rows]
    peaks = ", ".join(f"{p} {t:.3f}" for p, t in result["peak_tflops_measured"].items())
    lines.append(f"device: {result['device']} | matmul peak TFLOP/s: {peaks} | {result['tokens_per_step']:,} tokens/step")
    if "speedup" in result:
        lines.append(f"speedup ours/hf (tokens/s): {result['speedup']:.2f}x median steps, "
                     f"{result['speedup_fastest_steps']:.2f}x fastest steps")
    return "\n".join(lines)
