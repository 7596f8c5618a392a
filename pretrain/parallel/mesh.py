"""The process group and the DeviceMesh built from ``parallel.*`` (pp x dp_replicate x dp_shard x tp).

Pipeline stages are the outermost dim, as in torchtitan: the ranks of one stage are contiguous, and the
``pp`` group links the ranks that hold the same (dp, tp) coordinate of consecutive stages.

Expert parallelism borrows ranks from data parallelism as in torchtitan: dp_shard is split into
(dp_shard_mod_ep, ep); experts are sharded over ``ep`` and FSDP-sharded over ``dp_shard_mod_ep``, every
other parameter is FSDP-sharded over all of ``dp_shard``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pretrain import device as devices
from pretrain.config import ParallelConfig
from pretrain.errors import UserError
from pretrain.torch_compat import flatten_mesh

# We slice flattened dims (dp, dp_shard) from the root mesh as torchtitan does; torch announces a future change.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")


def unbounded_barrier() -> None:
    """A barrier without the collective timeout, for waits whose length is the work of one rank (rank 0 training
    the tokenizer and preprocessing the corpus while the others wait)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=dist.new_group(backend="gloo", timeout=timedelta(days=7)))


@dataclass
class ParallelDims:
    cfg: ParallelConfig
    world_size: int
    rank: int
    mesh: DeviceMesh | None = None

    @property
    def dp_size(self) -> int:
        return self.cfg.dp_replicate * self.cfg.dp_shard

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank() if self.mesh is not None else 0

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun (or SLURM through launch/) sets them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(pcfg: ParallelConfig, device: torch.device) -> tuple[ParallelDims, torch.device]:
    """Check the layout against the started processes, init the process group and build the mesh."""
    rank, local_rank, world = world_from_env()
    if rank >= world:
        raise UserError(f"the environment sets RANK={rank} but WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}: a "
                        "variable left over from another launcher? Unset RANK, LOCAL_RANK and WORLD_SIZE to train in one "
                        "process, or start the processes with torchrun (or the scripts of launch/ and slurm/).")
    if world != pcfg.world_size:
        stray = world > 1 and "TORCHELASTIC_RUN_ID" not in os.environ and "SLURM_JOB_ID" not in os.environ
        raise UserError(f"{world} process(es) were started{f' (WORLD_SIZE={world} in the environment)' if stray else ''}"
                        " but the parallel layout needs "
                        f"{pcfg.world_size} (dp_replicate {pcfg.dp_replicate} x dp_shard {pcfg.dp_shard} x tp {pcfg.tp} "
                        f"x pp {pcfg.pp}); start {pcfg.world_size} (torchrun --nproc_per_node ...) or change parallel.*.")
    dims = ParallelDims(pcfg, world, rank)
    if world == 1:
        return dims, device
    device = devices.set_local_device(device, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(devices.backend(device), timeout=timedelta(seconds=pcfg.collective_timeout_s))
    shard_mod_ep = pcfg.dp_shard // pcfg.ep
    mesh = init_device_mesh(device.type, (pcfg.pp, pcfg.dp_replicate, shard_mod_ep, pcfg.ep, pcfg.tp),
                            mesh_dim_names=("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp"))
    flatten_mesh(mesh, ("dp_shard_mod_ep", "ep"), "dp_shard")
    flatten_mesh(mesh, ("dp_replicate", "dp_shard_mod_ep", "ep"), "dp")
    flatten_mesh(mesh, ("dp_replicate", "dp_shard_mod_ep"), "dp_mod_ep")  # ranks holding the same experts
    dims.mesh = mesh
    return dims, device
