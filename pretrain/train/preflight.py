"""Pre-flight: before anything is allocated, a run whose memory cannot fit stops with the estimate and the keys to
change, instead of growing until the machine has no memory left (``train.preflight``).

The estimate is `pretrain plan`'s memory model (``pretrain/plan/memory.py``; docs/planning.md): weights, gradients
and optimizer state as the layout shards them, gathered weights, autocast copies, the activations each pipeline rank
keeps, logits. On a CPU the processes of one host share its memory, so the fullest rank counts once per local
process."""

from __future__ import annotations

import os

import torch

from pretrain import device as devices
from pretrain.config import RunConfig
from pretrain.errors import UserError
from pretrain.plan.memory import GiB, estimate


def check_memory(cfg: RunConfig, device: torch.device) -> None:
    est = estimate(cfg, device.type)
    need = est.total
    available = devices.available_memory_bytes(device)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    if need * sharing <= available:
        return
    worst = est.worst
    parts = sorted(worst.parts.items(), key=lambda kv: -kv[1])
    detail = ", ".join(f"{name} {size / GiB:.1f} GiB" for name, size in parts if size >= 0.05 * need)
    where = f"{sharing} processes on this host" if sharing > 1 else "this process"
    rank = f" (pipeline rank {est.worst_rank})" if cfg.parallel.pp > 1 else ""
    raise UserError(f"this run needs about {need / GiB:.1f} GiB per process{rank} ({detail}), {need * sharing / GiB:.1f} "
                    f"GiB for {where}, but {available / GiB:.1f} GiB of {device.type} memory are available. Lower "
                    "data.micro_batch_size or data.seq_len, set train.activation_checkpointing=full, or shard the "
                    "model over more ranks (parallel.dp_shard, tp, pp); `pretrain plan CONFIG` ranks the layouts that "
                    "fit. train.preflight=false skips this check.")
