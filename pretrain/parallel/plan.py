"""Apply the configured layout to a plain model: tensor parallel, expert parallel, then FSDP2 (docs/architecture.md,
data flow); the pipeline split comes before (``pipeline.PipelineSchedule``)."""

from __future__ import annotations

from dataclasses import replace

import torch.distributed as dist
from torch import nn

from pretrain.config import RunConfig
from pretrain.parallel.mesh import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, cfg: RunConfig, stages: list[nn.Module] | None = None) -> nn.Module:
    """Shard an initialised model in place. Every rank holds the same full weights beforehand (init by
    name and seed), so each layout starts from exactly the single-process weights. Under pipeline
    parallelism ``model`` holds this rank's stages and FSDP wraps each of their ``stages`` modules, the
    modules that run forward."""
    if not dims.is_parallel:
        return model
    p, mesh = cfg.parallel, dims.mesh
    if p.tp > 1:
        from pretrain.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=p.sequence_parallel,
                              loss_parallel=p.loss_parallel)
    if p.ep > 1:
        from pretrain.parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, mesh["ep"])
    if dims.dp_size > 1:
        from pretrain.parallel.data import apply_fsdp

        if stages:  # the schedule gathers each stage once per step (torchtitan's default): the split backward
            p = replace(p, reshard_after_forward=False)  # needs the gathered weights from F to W
        shared = shared_params(stages or [])
        for part in stages or [model]:
            apply_fsdp(part, mesh["dp_replicate", "dp_shard"], p, replicated=shared)
    return model


def shared_params(stages: list[nn.Module]) -> list[nn.Parameter]:
    """Parameters that two of this rank's pipeline stages hold: the tied embedding, where a V schedule puts the
    first and the last stage on one rank. Each stage is its own FSDP root, and FSDP2 lets a parameter belong
    to one group under one root only (a group of [embed, head] shared by two roots fails at the second root's
    lazy init), so these stay whole on every data-parallel rank, and the pipeline averages their gradients.
    Listed in stage order, so that the ranks of a data-parallel group all-reduce them in the same order."""
    seen: set[nn.Parameter] = set()
    shared: dict[nn.Parameter, None] = {}  # a set that keeps the order
    for stage in stages:
        for param in stage.parameters():
            if param in seen:
                shared[param] = None
            seen.add(param)
    return list(shared)


def dp_group(dims: ParallelDims):
    return dims.mesh["dp"].get_group() if dims.is_parallel else None


def all_reduce_sum(tensor, dims: ParallelDims):
    """Sum over data-parallel ranks (tensor-parallel ranks hold the same value already)."""
    if dims.is_parallel and dims.dp_size > 1:
        dist.all_reduce(tensor, group=dp_group(dims))
    return tensor


def finish_gradients(model: nn.Module, dims: ParallelDims, cfg: RunConfig) -> None:
    """After the last backward of a step: what FSDP does not reduce (expert-parallel weights)."""
    if dims.is_parallel and cfg.parallel.ep > 1:
        from pretrain.parallel.expert import sync_expert_grads

        replicas = dims.mesh["dp_mod_ep"]
        sync_expert_grads(model, dims.dp_size, replicas.get_group() if replicas.size() > 1 else None)


def data_parallel_total(group):
    """A ``MoEContext.total`` for ``model.moe.balance_scope: global``: the sum over the data-parallel ranks in
    value, whose gradient reaches only this rank's own share, so that summing the ranks' gradients (what FSDP
    does, with the loss scaled by dp) gives the exact gradient."""
    def total(local):
        summed = local.detach().clone()
        dist.all_reduce(summed, group=group)
        return local + (summed - local.detach())
    return total
