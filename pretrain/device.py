"""Device handling in one place: the same code runs on CPU (tests, gloo) and GPU (NCCL)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Dense peak TFLOP/s from the datasheets (SXM parts), for MFU on known GPUs: bf16 and TF32 on the tensor
# cores, fp32 on the CUDA cores (what an fp32 matmul gets under torch's default matmul precision "highest").
DATASHEET_TFLOPS = {
    "H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from pretrain.errors import UserError

        raise UserError("train.device is 'cuda' but no CUDA device is visible; use train.device=auto or cpu.")
    return torch.device(name)


def backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def set_local_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def retain_host_memory(device: torch.device) -> None:
    """On CPU, have glibc keep freed memory for reuse (no mmap for large blocks, no trimming) rather than
    hand it back to the OS: otherwise every step's large tensors (logits, gradients) return as fresh pages
    that fault in and are zeroed by the kernel (1.5 GB a step at the shape of configs/bench_small.yaml with
    4 sequences, a tenth of the step time). The host-side counterpart of CUDA's caching allocator; nothing
    changes without glibc."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak tensor memory since the last ``reset_peak_memory`` on a GPU; on CPU the process's resident-set
    high-water mark (ru_maxrss), which covers everything the process ever held and is never reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def available_memory_bytes(device: torch.device) -> float:
    """Memory a run on ``device`` can still take: the GPU's free memory, or the host's available memory (what
    Linux reports as MemAvailable; all physical memory elsewhere)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def allocated_mb(device: torch.device) -> float:
    """Tensor memory allocated right now on a GPU; 0 on CPU, which has no such counter."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return 0.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_info()['model']} CPU, {torch.get_num_threads()} threads"


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    """The CPU's model name and the instruction-set features that decide matmul speed per dtype: without
    AVX512_BF16 or AMX, bf16 matmuls are emulated and far slower than fp32 (read from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return {"model": model, "features": [f for f in CPU_FEATURES if f in flags]}


def datasheet_tflops(device: torch.device, precision: str) -> float | None:
    """Dense datasheet peak of a known GPU, None elsewhere. fp32 counts as TF32 when torch may use it
    (``torch.set_float32_matmul_precision("high")`` or ``"medium"``)."""
    if device.type == "cuda":
        if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
            precision = "tf32"
        name = torch.cuda.get_device_name(device)
        for key, table in DATASHEET_TFLOPS.items():
            if key in name:
                return table[precision]
    return None


def peak_tflops(device: torch.device, precision: str) -> float:
    """Datasheet peak for a known GPU; otherwise a quick measurement of the matmul peak (~0.3 s), made once per
    process, device and precision (a process that runs several trainings, or grows a run, measures once)."""
    datasheet = datasheet_tflops(device, precision)
    if datasheet is not None:
        return datasheet
    key = (str(device), precision)
    if key not in _MEASURED_PEAK:
        _MEASURED_PEAK[key] = measure_matmul_tflops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    return _MEASURED_PEAK[key]


_MEASURED_PEAK: dict[tuple[str, str], float] = {}


@dataclass
class MatmulPeak:
    tflops: float
    sizes: list[int]  # the square sizes measured, in order


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.3,
                        max_size: int = 4096) -> MatmulPeak:
    """The best square-matmul rate, growing the size from 256 (doubling) while the budget allows: a size runs only
    when one of its matmuls, at the best rate seen, fits in what is left of ``seconds``. So a dtype the hardware
    emulates (bf16 on a CPU without AVX512_BF16) costs the budget, not minutes."""
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run must draw what it would have
    deadline = time.perf_counter() + seconds
    best, sizes, n = 0.0, [], 256
    while n <= max_size:
        left = deadline - time.perf_counter()
        if left <= 0 or (best and 2 * n**3 / (best * 1e12) > left):
            break
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        sizes.append(n)
        share = time.perf_counter() + max(left / 4, 0.0)  # a quarter of what is left for this size
        while True:
            synchronize(device)
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e12)
            if time.perf_counter() >= min(share, deadline):
                break
        n *= 2
    return MatmulPeak(best, sizes)


@dataclass
class Bf16Probe:
    native: bool  # bf16 matmuls run on hardware made for them (not emulated)
    slowdown: float | None  # measured time of a bf16 matmul over an fp32 one of the same size (None: not timed)
    how: str  # what decided, for the log


def bf16_probe(device: torch.device) -> Bf16Probe:
    """Whether bf16 matmuls are native here. A GPU says so itself; a CPU by its features (AVX512_BF16 or AMX; where
    /proc/cpuinfo cannot say, by the timing) and a timed 512 x 512 matmul per dtype (well under a second), cached per
    machine and torch version in ``$XDG_CACHE_HOME/pretrain`` (every rank of a node then decides alike)."""
    if device.type == "cuda":
        return Bf16Probe(torch.cuda.is_bf16_supported(), None, torch.cuda.get_device_name(device))
    info = cpu_info()
    key = f"{info['model']}|{','.join(info['features'])}|{torch.__version__}|{torch.get_num_threads()}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pretrain" / "bf16_probe.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = time_bf16_matmul()
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=1) + "\n")
    slowdown = float(known[key])
    features = set(info["features"])
    if Path("/proc/cpuinfo").is_file():
        native = bool(features & {"avx512_bf16", "amx_bf16"})
        how = f"{info['model']}: {'AVX512_BF16/AMX' if native else 'no AVX512_BF16 or AMX'}"
    else:
        native, how = slowdown < 1.2, f"{info['model']}: timed"
    return Bf16Probe(native, slowdown, how)


def time_bf16_matmul(n: int = 512, reps: int = 3, budget_s: float = 0.3) -> float:
    """The best time of an n x n bf16 matmul over the best fp32 one on this CPU (below 1 where bf16 is native; near
    1 below n = 512 either way, where torch computes small bf16 products in fp32). Stops repeating once the bf16
    matmuls have taken ``budget_s`` (an emulated bf16 matmul of this size can take a fifth of a second)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        times, spent = [], 0.0
        for _ in range(reps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
            spent += times[-1]
            if spent > budget_s and len(times) > 1:
                break
        best[dtype] = min(times[1:] or times)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The precision a run uses for ``train.precision`` = ``requested`` on ``device``, and what to tell the user
    (None: nothing). ``auto`` is bf16 where bf16 matmuls are native, else fp32; an explicit bf16 where they are
    emulated is kept, with a warning and the measured slowdown."""
    if requested == "fp32":
        return "fp32", None
    probe = bf16_probe(device)
    slower = f"; a bf16 matmul measured {probe.slowdown:.1f}x the time of an fp32 one" if probe.slowdown else ""
    if requested == "auto":
        chosen = "bf16" if probe.native else "fp32"
        return chosen, f"train.precision=auto: {chosen} ({probe.how}{slower})"
    if not probe.native:
        return "bf16", (f"warning: train.precision=bf16 on a device without native bf16 matmuls ({probe.how}{slower}): "
                        "they are emulated and the run will be that much slower; train.precision=auto or fp32 "
                        "trains faster here.")
    return "bf16", None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    return measure_matmul_peak(device, dtype, seconds).tflops


def accelerator_rng_state() -> list:
    """Every visible GPU's RNG state (empty on CPU), for checkpoints."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def set_accelerator_rng_state(states: list) -> None:
    if states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states)
