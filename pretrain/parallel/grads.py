"""The global gradient norm and clipping, one routine for every layout: plain tensors, DTensors on different
meshes (tensor-parallel 2-D weights beside FSDP 1-D ones beside expert-parallel ones), and pipeline stages
whose ranks hold different parameters.

``torch.nn.utils.get_total_norm`` stacks per-tensor norms, which needs every gradient on one mesh, and it
takes a square root per tensor. Here each gradient's squared local norm is summed per (mesh, placements)
group, over the mesh dimensions that shard that group, then over the pipeline ranks: one square root at the
end, and no value read on the host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from pretrain.torch_compat import StridedShard


def grad_norm(params: Iterable[nn.Parameter], device: torch.device, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The L2 norm of the gradients of ``params`` over every rank that holds a part of them; ``group`` links ranks
    holding different parameters (pipeline stages), whose squared norms add up."""
    groups: dict = defaultdict(list)
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            # Pending partial sums (e.g. replicated norm weights under sequence parallelism): reduce a copy for
            # the norm; scaling the partial summands scales their sum alike.
            g = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups[key].append(g.to_local() if isinstance(g, DTensor) else g)
    total = None
    for key, tensors in groups.items():
        sq = torch.stack([t.float().pow(2).sum() for t in tensors]).sum()
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if isinstance(placement, (Shard, StridedShard)) and mesh.size(dim) > 1:
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), device=device)
    if group is not None:
        dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_grads_(params: Iterable[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients in place by max_norm / norm when the norm is larger (no host read). Each gradient's
    local tensor is scaled: ``clip_grads_with_norm_`` would hand its DTensors a plain-tensor factor, which
    DTensor's multi-tensor kernels refuse."""
    if max_norm == float("inf"):
        return
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.device))

