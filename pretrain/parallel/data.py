"""Data parallelism with FSDP2 (``fully_shard``): ZeRO-3 sharding over dp_shard, replication over
dp_replicate (HSDP when both are > 1, DDP-style all-reduce when only dp_replicate is), fp32 reduction."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pretrain.config import ParallelConfig


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, pcfg: ParallelConfig,
               replicated: Iterable[nn.Parameter] = ()) -> None:
    """Wrap each block, then the root (embedding, final norm, head). ``dp_mesh`` is the 2-D
    (dp_replicate, dp_shard) mesh: FSDP2 replicates over its first dim and shards over its second.
    ``replicated`` parameters are left whole on every rank; their caller averages their gradients."""
    from pretrain.parallel.expert import expert_params

    ignored = expert_params(model) | set(replicated) or None  # expert-parallel weights are sharded over ep, not by FSDP
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if pcfg.param_dtype == "bf16" else None,
                              reduce_dtype=torch.float32)
    for block in model.blocks.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=pcfg.reshard_after_forward, mp_policy=mp,
                    ignored_params=ignored)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=pcfg.reshard_after_forward, mp_policy=mp,
                ignored_params=ignored)
