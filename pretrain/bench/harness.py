"""The benchmark harness shared by ``pretrain bench`` and the scripts in ``benchmarks/``: variants timed in round
robin (A B C A B C ...) so that a noisy minute of a shared machine hits every variant alike, robust summaries
of the times, the machine's matmul peak measured on the spot, synthetic data, and one JSON format with the
environment (device, torch, CPU features) next to every figure. Timings are reported, never asserted."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain import device as devices
from pretrain.config import RunConfig
from pretrain.data.loader import MicroBatch


@dataclass
class Sample:
    """One timed call of a variant: its wall time, what it returned, and (GPU) the tensor memory it held."""

    seconds: float
    output: Any
    peak_mb: float
    held_mb: float


def round_robin(variants: dict[str, Callable[[int], Any]], rounds: int, device: torch.device,
                on_sample: Callable[[int, str, Sample], None] | None = None) -> dict[str, list[Sample]]:
    """Call every variant once per round, in order (``variant(round)``), each timed with the device synchronised
    before and after; on a GPU the peak tensor memory of each call is recorded too. ``on_sample(round, name,
    sample)`` sees each call as it ends (progress lines)."""
    samples: dict[str, list[Sample]] = {name: [] for name in variants}
    for i in range(rounds):
        for name, run in variants.items():
            devices.reset_peak_memory(device)
            devices.synchronize(device)
            held = devices.allocated_mb(device)
            t0 = time.perf_counter()
            output = run(i)
            devices.synchronize(device)
            seconds = time.perf_counter() - t0
            samples[name].append(Sample(seconds, output, devices.peak_memory_mb(device), held))
            if on_sample is not None:
                on_sample(i, name, samples[name][-1])
    return samples


def summarize(times: list[float]) -> dict:
    """Median, extremes and the 10th-90th percentile spread of some timings (seconds)."""
    median = statistics.median(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [median] * 9
    return {"median": median, "min": min(times), "max": max(times), "p10": q[0], "p90": q[-1],
            "spread": (q[-1] - q[0]) / median}


def matmul_peak_tflops(device: torch.device, precision: str, seconds: float = 1.5) -> float:
    """The best matmul rate over square sizes up to 4096 (8192 on a GPU, which needs it to fill up), within
    ``seconds``: the peak this machine reaches right now."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return devices.measure_matmul_peak(device, dtype, seconds, 8192 if device.type == "cuda" else 4096).tflops


def environment(device: torch.device) -> dict:
    """What a figure depends on: the device (with the CPU's model and matmul-relevant features), torch, threads."""
    return {"device": devices.device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": devices.cpu_info()}


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


def synthetic_dataset(prefix: Path, vocab_size: int, seq_len: int, seed: int, documents: int = 4) -> None:
    """A small megatron-core indexed dataset of random ids, for a real run (the data loader) without a corpus."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(vocab_size))
    for _ in range(documents):
        builder.add_item(torch.from_numpy(rng.integers(0, vocab_size, 4 * (seq_len + 1))))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
