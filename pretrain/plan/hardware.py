"""The machines `pretrain plan` knows: accelerators (memory, dense matmul peak, memory bandwidth, the link between
the GPUs of a node) and networks between nodes. Datasheet figures; what a run achieves of them is the
utilisation factor (``Device.efficiency``), stated, not fitted per run (docs/planning.md)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pretrain.errors import UserError

GB = 1e9


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float  # usable by tensors: the datasheet capacity less the runtime's share (context, NCCL, allocator)
    tflops: dict  # dense datasheet peak by precision (bf16; fp32 = what an fp32 matmul gets: TF32 on GPUs)
    hbm_gbps: float  # memory bandwidth, for the optimizer step (memory bound)
    intra_gbps: float  # per-GPU bandwidth to the other GPUs of its node, one direction (NVLink / xGMI)
    efficiency: float  # achieved fraction of the matmul peak in a training step (large GEMMs, attention, norms)
    runtime_bytes: float  # what the runtime holds besides tensors (CUDA context, NCCL buffers, allocator slack)
    latency_s: float = 10e-6  # per step of a collective inside a node
    overlap: bool = True  # data-parallel collectives run beside the compute (GPUs: NCCL on its own streams)


# Datasheet: NVIDIA H100/H200/A100/B200 SXM, AMD MI300X. The runtime share is what torch + NCCL hold on an
# H100 before the first tensor (~1.5 GB) plus the caching allocator's typical fragmentation (~5% of the rest).
DEVICES = {
    "h100": Device("H100 SXM 80GB", 80 * GB, {"bf16": 989.0, "fp32": 494.0}, 3350, 450, 0.45, 1.5 * GB + 4 * GB),
    "h200": Device("H200 SXM 141GB", 141 * GB, {"bf16": 989.0, "fp32": 494.0}, 4800, 450, 0.45, 1.5 * GB + 7 * GB),
    "a100": Device("A100 SXM 80GB", 80 * GB, {"bf16": 312.0, "fp32": 156.0}, 2039, 300, 0.6, 1.5 * GB + 4 * GB),
    "a100-40gb": Device("A100 SXM 40GB", 40 * GB, {"bf16": 312.0, "fp32": 156.0}, 1555, 300, 0.6, 1.5 * GB + 2 * GB),
    "b200": Device("B200 180GB", 180 * GB, {"bf16": 2250.0, "fp32": 1100.0}, 8000, 900, 0.5, 1.5 * GB + 9 * GB),
    "mi300x": Device("MI300X 192GB", 192 * GB, {"bf16": 1307.0, "fp32": 653.0}, 5300, 448, 0.4, 1.5 * GB + 9 * GB),
}

# Per-GPU bandwidth between nodes, one direction, GB/s (one NIC per GPU): InfiniBand NDR 400 Gb/s, HDR 200 Gb/s,
# RoCE 100 Gb/s, 25 Gb/s Ethernet shared by the node's GPUs (given per GPU for 8 GPUs).
NETWORKS = {"ib400": 50.0, "ib200": 25.0, "roce100": 12.5, "eth25": 25 / 8 / 8}
BUS_EFFICIENCY = 0.8  # achieved fraction of the link's bandwidth in large collectives (nccl-tests bus bandwidth)
LATENCY_S = {"intra": 10e-6, "inter": 20e-6}  # per collective step


def cpu_device(threads: int, tflops_fp32: float, memory_bytes: float) -> Device:
    """This machine as a device: the fp32 matmul rate measured with ``threads`` threads, its available memory,
    and gloo between its processes over loopback TCP: ~0.3 GB/s and ~1 ms a collective step (measured with 2
    single-threaded ranks on a 2-core Xeon: all-gather of 40 MB 0.26 GB/s, all-reduce 1.0 GB/s, a 4 KB
    all-reduce 2 ms). Collectives take the cores the compute needs, so nothing overlaps."""
    import platform

    return Device(f"CPU ({platform.processor() or platform.machine()}, {threads} threads per rank)", memory_bytes,
                  {"fp32": tflops_fp32, "bf16": tflops_fp32}, 20, 0.3, 0.6, 0.0, latency_s=1e-3, overlap=False)


def get_device(name: str, efficiency: float | None = None) -> Device:
    if name not in DEVICES:
        raise UserError(f"--gpu {name!r} is not a device pretrain plan knows; choose one of {', '.join(DEVICES)} "
                        "(or cpu: this machine, measured).")
    dev = DEVICES[name]
    return replace(dev, efficiency=efficiency) if efficiency else dev


def get_network(name: str) -> float:
    if name not in NETWORKS:
        raise UserError(f"--network {name!r} is not a network pretrain plan knows; choose one of "
                        f"{', '.join(NETWORKS)}.")
    return NETWORKS[name]
