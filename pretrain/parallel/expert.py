"""Expert parallelism: each MoE layer's stacked experts are sharded over the ``ep`` ranks (whole experts,
E/ep per rank) and the routed tokens travel to their expert's rank and back with all-to-all.

Each rank routes its own tokens (capacity applies there, as in the single-process model), sorts the
assignments by expert, and sends each rank the slice for its experts; token counts are exchanged first
because dropless routing makes them vary (one host read per layer and step, unavoidable for the split
sizes). The receiver re-sorts what it got by local expert, runs its experts, and the reverse all-to-all
returns the outputs in the sender's order, where the ordinary combine follows. The all-to-alls are
differentiable, so backward retraces the same route.

Expert weights are DTensors sharded on dim 0 over the ep mesh, so checkpoints hold global expert tensors
and resume under any ep. FSDP leaves them alone; ``sync_expert_grads`` reduces their gradients over the
data-parallel ranks that hold the same experts (dp_replicate x dp_shard/ep), when there are any.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from pretrain.errors import UserError
from pretrain.models.moe import MoE, moe_layers
from pretrain.torch_compat import all_to_all_single_autograd


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    for moe in moe_layers(model):
        if moe.experts is not None:
            raise UserError("expert parallelism shards stacked (dense) experts; structured experts "
                            "(model.ffn.kind != dense) run with parallel.ep=1.")
        for name in moe.expert_weights():
            param = getattr(moe, name)
            dist_param = distribute_tensor(param.data, ep_mesh, [Shard(0)])
            moe.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))
        moe.exchange = _Exchange(ep_mesh)


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    return {p for moe in moe_layers(model) for p in moe.expert_weights().values() if isinstance(p, DTensor)}


class _Exchange:
    def __init__(self, ep_mesh: DeviceMesh):
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()

    def __call__(self, moe: MoE, xs: torch.Tensor, counts: torch.Tensor, kept_counts: torch.Tensor) -> torch.Tensor:
        ep, local_e = self.ep, moe.num_experts // self.ep
        # counts[e] assignments for global expert e, e = owner * local_e + local index.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [source rank][local expert]
        send_rows, recv_rows = counts.view(ep, local_e).sum(1), received.view(ep, local_e)
        send_split, recv_split = send_rows.tolist(), recv_rows.sum(1).tolist()
        xs_recv = all_to_all_single_autograd(xs, recv_split, send_split, self.group)
        # Rows arrive grouped by source, then by local expert: a stable sort by local expert groups them.
        local_ids = torch.repeat_interleave(torch.arange(local_e, device=xs.device).repeat(ep), recv_rows.reshape(-1))
        order = torch.sort(local_ids, stable=True).indices
        local_counts = recv_rows.sum(0)
        weights = {name: w.to_local() for name, w in moe.expert_weights().items()}
        ys_sorted = moe.run_experts(xs_recv[order], local_counts, local_counts, weights)
        ys_recv = torch.empty_like(ys_sorted).index_copy(0, order, ys_sorted)
        return all_to_all_single_autograd(ys_recv, send_split, recv_split, self.group)


def sync_expert_grads(model: nn.Module, dp_size: int, replica_group: dist.ProcessGroup | None) -> None:
    """Expert gradients hold dp_size x (their ep group's share): average over the other ep groups."""
    for p in expert_params(model):
        if p.grad is None:
            continue
        g = p.grad.to_local()
        if replica_group is not None:
            dist.all_reduce(g, group=replica_group)
        g.div_(dp_size)
