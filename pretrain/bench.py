"""`pretrain bench CONFIG`: training throughput of our trainer, and with ``--against hf`` of the Hugging Face
``transformers`` model of the same shape, measured side by side in one process.

Shared machines are noisy, so every figure is a ratio taken in the same run: the two variants alternate
step by step (ours, hf, ours, hf, ...) on the same synthetic batches (uniform random token ids of the
config's shape; no tokenizer or data needed, ``model.vocab_size`` must be set), and MFU divides by a matmul
peak measured on the spot for the precision in use (and, on a known GPU, by the datasheet peak too).

* ours: the real ``Trainer.train_step`` (model, activation checkpointing, compile, AdamW kernels, autocast
  as configured). The Trainer is built on a throw-away indexed dataset of random ids in a temporary directory.
* hf: ``LlamaForCausalLM`` / ``MixtralForCausalLM`` from the same shape (random init, SDPA attention, eager),
  AdamW with the same groups, hyper-parameters and kernels, the same clipping and gradient accumulation.
  Its logits get our loss (``lm_loss_sum``: labels shifted in the data, logits never sliced), so both sides
  compute the same thing; Mixtral's balance loss is added as in training.

Peak memory, over the timed steps: on a GPU each variant's own (its weights, gradients and optimizer state plus
the peak its step allocates above everything resident; both variants live on the device at once); on a CPU
only the process-wide resident high-water mark exists, which the two variants share.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pretrain import device as devices
from pretrain.config import RunConfig
from pretrain.data.loader import MicroBatch
from pretrain.errors import UserError
from pretrain.models.transformer import flops_per_token

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer

Step = Callable[[list[MicroBatch]], torch.Tensor]
PROFILE_STEPS = 2  # `--profile`: steps of each variant profiled after the timed ones


def synthetic_batches(cfg: RunConfig, steps: int) -> list[list[MicroBatch]]:
    """``steps`` global batches of uniform random ids (one data-parallel rank), labels shifted by one."""
    d, vocab = cfg.data, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (d.global_batch_size // d.micro_batch_size, d.micro_batch_size, d.seq_len + 1),
                            generator=gen)
        batches.append([MicroBatch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), torch.ones(x.shape[0], d.seq_len))
                        for x in ids])
    return batches


def _synthetic_dataset(prefix: Path, cfg: RunConfig) -> None:
    """A small megatron-core indexed dataset of random ids: what the Trainer reads at construction."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = np.random.default_rng(cfg.train.seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(cfg.model.vocab_size))
    for _ in range(4):
        builder.add_item(torch.from_numpy(rng.integers(0, cfg.model.vocab_size, 4 * (cfg.data.seq_len + 1))))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def our_trainer(cfg: RunConfig, workdir: Path, steps: int) -> Trainer:
    """Our Trainer, built as ``pretrain train`` builds it, on random ids written under ``workdir``."""
    from pretrain.config import BlendEntry
    from pretrain.train.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    _synthetic_dataset(workdir / "random_ids", cfg)
    cfg.data.blend, cfg.data.sources, cfg.data.split = [BlendEntry(path=str(workdir / "random_ids"))], [], "100,0,0"
    cfg.tokenizer.path = str(workdir / "no_tokenizer.model")
    cfg.train.run_dir, cfg.train.resume, cfg.train.max_steps = str(workdir / "run"), "never", steps
    cfg.logging.tensorboard = False
    with warnings.catch_warnings():  # megatron-core: random ids have no pad token, which is intended here
        warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")
        trainer = Trainer(cfg, log=lambda *a, **k: None)
    trainer.model.train()
    return trainer


def our_step(cfg: RunConfig, workdir: Path, steps: int) -> tuple[Step, tuple]:
    """Our Trainer's optimizer step, and what it keeps between steps (model, optimizer)."""
    trainer = our_trainer(cfg, workdir, steps)
    return (lambda micro_batches: trainer.train_step(micro_batches)[0]), (trainer.model, trainer.optimizer)


def hf_model(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The ``transformers`` model that computes ours exactly (Llama or Mixtral), randomly initialised."""
    try:
        import transformers
    except ImportError:
        raise UserError("--against hf needs the `transformers` library: pip install -e '.[hf]'.") from None
    from pretrain.convert.hf import architecture
    from pretrain.convert.llama import decoder_config

    m, kind = cfg.model, architecture(cfg.model)
    common = dict(decoder_config(cfg), use_cache=False, attention_dropout=0.0)
    if kind == "llama":
        config = transformers.LlamaConfig(intermediate_size=m.ffn_size, attention_bias=False, mlp_bias=False,
                                          initializer_range=m.init_std, **common)
    elif kind == "mixtral":
        config = transformers.MixtralConfig(
            intermediate_size=m.moe.expert_ffn_hidden_size or m.ffn_size, num_local_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.top_k, router_aux_loss_coef=m.moe.balance_coef, router_jitter_noise=0.0,
            sliding_window=None, initializer_range=m.init_std, **common)
    else:
        raise UserError(f"--against hf compares with LlamaForCausalLM or MixtralForCausalLM, but this model exports as "
                        f"'{kind}' (norm {m.norm}, placement {m.norm_placement}, ffn {m.ffn.kind}/{m.ffn.activation}, "
                        f"router {m.moe.router}); use a pre-norm RMSNorm SwiGLU model, dense or top-k softmax MoE.")
    torch.manual_seed(cfg.train.seed)
    # fp32 weights (torch's default dtype; the dtype keyword is spelt differently across transformers versions)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device).train()


def hf_step(cfg: RunConfig, model: torch.nn.Module, device: torch.device, precision: str) -> tuple[Step, tuple]:
    """One optimizer step of the HF model, the way our trainer takes one, and what it keeps between steps."""
    from pretrain.train.optim import adamw, param_groups
    from pretrain.train.trainer import lm_loss_sum

    optimizer = adamw(param_groups(model, cfg.optim.weight_decay), cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    moe = cfg.model.moe.num_experts > 0
    max_norm = cfg.optim.grad_clip or float("inf")

    def step(micro_batches: list[MicroBatch]) -> torch.Tensor:
        n_tokens = torch.tensor(sum(float(mb.loss_mask.sum()) for mb in micro_batches), device=device)
        loss_total = torch.zeros((), device=device)
        for mb in micro_batches:
            mb = mb.to(device)
            with devices.autocast(device, precision):
                out = model(input_ids=mb.tokens, output_router_logits=True) if moe else model(input_ids=mb.tokens)
            loss = lm_loss_sum(out.logits, mb) / n_tokens
            aux = model.config.router_aux_loss_coef * out.aux_loss / len(micro_batches) if moe else 0.0
            (loss + aux).backward()
            loss_total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_total

    return step, (model, optimizer)


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


def matmul_peak_tflops(device: torch.device, precision: str) -> float:
    """The best matmul rate over a few square sizes: the peak this machine reaches right now."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sizes = (1024, 2048, 4096) + ((8192,) if device.type == "cuda" else ())  # a GPU needs 8192 to fill up
    return max(devices.measure_matmul_tflops(device, dtype, n=n, seconds=0.4) for n in sizes)


def _summary(times: list[float], losses: list[float], mems: list[float], tokens_per_step: int, flops: float,
             peak: float, datasheet: float | None) -> dict:
    median = statistics.median(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [median] * 9
    tps = tokens_per_step / median
    out = {"tokens_per_s": tps, "tflops": tps * flops / 1e12, "mfu": tps * flops / (peak * 1e12),
           "peak_mem_mb": max(mems),
           "step_time_s": {"median": median, "min": min(times), "max": max(times), "p10": q[0], "p90": q[-1],
                           "spread": (q[-1] - q[0]) / median},
           "loss_first": losses[0], "loss_last": losses[-1]}
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
    device = devices.resolve(cfg.train.device)
    precision = {"ours": cfg.train.precision,
                 "hf": cfg.train.precision if hf_precision == "same" else hf_precision}
    names = ["ours"] + (["hf"] if against == "hf" else [])
    with tempfile.TemporaryDirectory(prefix="pretrain_bench_") as tmp:
        variants: dict[str, Step] = {}
        holds: dict[str, tuple] = {}
        variants["ours"], holds["ours"] = our_step(cfg, Path(tmp), warmup + steps)
        if against == "hf":
            model = hf_model(cfg, device)
            variants["hf"], holds["hf"] = hf_step(cfg, model, device, precision["hf"])
        peaks = {p: matmul_peak_tflops(device, p) for p in sorted(set(precision[n] for n in names))}
        batches = synthetic_batches(cfg, warmup + steps)
        times: dict[str, list[float]] = {n: [] for n in names}
        losses: dict[str, list[float]] = {n: [] for n in names}
        mems: dict[str, list[float]] = {n: [] for n in names}
        for i, micro_batches in enumerate(batches):
            for name in names:  # interleaved: ours, hf, ours, hf, ...
                devices.reset_peak_memory(device)
                devices.synchronize(device)
                held = devices.allocated_mb(device)
                t0 = time.perf_counter()
                loss = variants[name](micro_batches)
                devices.synchronize(device)
                elapsed = time.perf_counter() - t0
                losses[name].append(float(loss))
                if i >= warmup:  # the steady state: compilation's and the first step's allocations left out
                    times[name].append(elapsed)
                    peak = devices.peak_memory_mb(device)
                    # On a GPU: the variant's own resident tensors plus what its step allocated on top of all
                    # that was resident, so that the other variant's weights and optimizer state don't count.
                    mems[name].append(peak - held + resident_mb(*holds[name]) if device.type == "cuda" else peak)
                log(f"  step {i + 1:>3}/{warmup + steps} {name:<4} {elapsed:7.3f} s  loss {float(loss):.4f}"
                    + ("  (warm-up)" if i < warmup else ""))
        peaks = {p: max(peaks[p], matmul_peak_tflops(device, p)) for p in peaks}  # again after: noisy machines
        profiled = batches[-PROFILE_STEPS:]  # the last batches again (fewer when the run has fewer)
        tops = profile_steps(variants, profiled, device, Path(profile_dir), log) if profile_dir else None
    d = cfg.data
    tokens_per_step = d.global_batch_size * d.seq_len
    flops = flops_per_token(cfg.model, d.seq_len)
    result = {
        "device": devices.device_name(device), "torch": torch.__version__, "steps": steps, "warmup": warmup,
        "shape": {"vocab_size": cfg.model.vocab_size, "hidden_size": cfg.model.hidden_size,
                  "num_layers": cfg.model.num_layers, "num_heads": cfg.model.num_heads,
                  "num_kv_heads": cfg.model.kv_heads, "ffn_hidden_size": cfg.model.ffn_size,
                  "num_experts": cfg.model.moe.num_experts, "top_k": cfg.model.moe.top_k, "seq_len": d.seq_len,
                  "micro_batch_size": d.micro_batch_size, "global_batch_size": d.global_batch_size},
        "settings": {"precision": precision, "compile": {"ours": cfg.train.compile, "hf": False},
                     "activation_checkpointing": cfg.train.activation_checkpointing, "optim_impl": cfg.optim.impl},
        "tokens_per_step": tokens_per_step, "flops_per_token": flops,
        "peak_tflops_measured": peaks,
        "peak_mem_scope": "per variant: its resident tensors + its step's peak above all resident (GPU allocator)"
                          if device.type == "cuda" else
                          "process-wide resident high-water mark (ru_maxrss), shared by both variants on CPU",
    }
    for name in names:
        result[name] = _summary(times[name], losses[name], mems[name], tokens_per_step, flops,
                                peaks[precision[name]], devices.datasheet_tflops(device, precision[name]))
    if tops is not None:
        result["profile"] = {"dir": str(profile_dir), "steps": len(profiled), **tops}
    if "hf" in variants:
        import transformers

        result["hf"].update({"model_class": type(model).__name__, "transformers": transformers.__version__,
                             "attn_implementation": model.config._attn_implementation,
                             "loss": "lm_loss_sum on the HF logits with pre-shifted labels (no logits slicing)"})
        if cfg.model.moe.num_experts:
            # transformers >= 5 picks an experts kernel (eager loop, grouped_mm, ...); 4.x always loops
            result["hf"]["experts_implementation"] = getattr(model.config, "_experts_implementation", "eager loop")
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


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
