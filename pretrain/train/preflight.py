"""Pre-flight: before anything is allocated, a run whose memory cannot fit stops with the estimate and the keys to
change, instead of growing until the machine has no memory left (``train.preflight``).

The estimate is a floor, not a forecast (``pretrain plan`` will model memory properly): the model state (fp32
weights, gradients and two AdamW moments: 16 bytes a parameter, divided over the ranks that shard it), the
logits of one micro-batch (kept, upcast for the loss, and their gradient), the activations every block keeps for
backward (what full activation checkpointing leaves: the block inputs), and the attention probabilities the
blocked CPU kernel keeps. A run refused here would certainly not have fit."""

from __future__ import annotations

import os

import torch

from pretrain import device as devices
from pretrain.config import RunConfig
from pretrain.errors import UserError
from pretrain.models.attention import uses_blocked_kernel
from pretrain.models.transformer import num_params


def memory_floor(cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Bytes one process needs at least, by part."""
    m, d, p = cfg.model, cfg.data, cfg.parallel
    tokens = d.micro_batch_size * d.seq_len
    layers = -(-m.num_layers // p.pp)
    shards = p.dp_shard * p.tp * p.pp
    per_token_layer = 4 * m.hidden_size if cfg.train.activation_checkpointing != "none" else (
        4 * (6 * m.hidden_size + 3 * m.ffn_size))
    parts = {"model state (weights, gradients, AdamW)": 16.0 * num_params(m) / shards,
             "logits of a micro-batch": 12.0 * tokens * m.vocab_size / p.tp,
             "activations kept for backward": float(tokens) * layers * per_token_layer / p.tp}
    if uses_blocked_kernel(m.attention_kernel, device, cfg.train.precision, cfg.train.compile):
        dtype_bytes = 2 if cfg.train.precision == "bf16" else 4
        kept = 1 if cfg.train.activation_checkpointing == "full" else layers
        parts["attention probabilities (blocked kernel)"] = (
            5 / 8 * d.micro_batch_size * m.num_heads / p.tp * d.seq_len ** 2 * dtype_bytes * kept)
    return parts


def check_memory(cfg: RunConfig, device: torch.device) -> None:
    parts = memory_floor(cfg, device)
    need = sum(parts.values())
    available = devices.available_memory_bytes(device)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    if need * sharing <= available:
        return
    gb = 2**30
    detail = ", ".join(f"{name} {size / gb:.1f} GB" for name, size in parts.items())
    where = f"{sharing} processes on this host" if sharing > 1 else "this process"
    raise UserError(f"this run needs at least {need / gb:.1f} GB per process ({detail}), {need * sharing / gb:.1f} GB for "
                    f"{where}, but {available / gb:.1f} GB of {device.type} memory are available. Lower "
                    "data.micro_batch_size or data.seq_len, set train.activation_checkpointing=full, or shard the "
                    "model over more ranks (parallel.dp_shard, tp, pp); train.preflight=false skips this check.")
