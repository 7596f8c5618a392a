"""Tensor and sequence parallelism with DTensor plans (Megatron-style column/row splits).

Per block: q/k/v and the FFN input projections are column-parallel (output features sharded), the
attention output and FFN output projections row-parallel (input features sharded, partial sums
reduced). The embedding is vocab-parallel and the LM head column-parallel with its logits left sharded
for the vocab-parallel cross-entropy (``loss_parallel``). With sequence parallelism the norms and the
residual stream between sub-layers are sharded along the sequence.

Structured FFN linears (docs/methods.md, structured FFN layers) shard so that the result is exact, by sharding only the
factor next to the split dimension and letting DTensor propagate the rest:

| layer (y = ...)               | column-parallel (y sharded)    | row-parallel (x sharded)           |
|-------------------------------|--------------------------------|------------------------------------|
| lowrank U(Vx)                 | V replicated, U rows sharded   | V columns sharded, U replicated    |
| blockdense U bd(V) x          | V replicated, U rows sharded   | V blocks sharded, U columns sharded|
| blockshuffle Q bd(W2) P bd(W1)| W1 replicated, W2 rows sharded | W1 blocks sharded, W2 replicated   |
| self-guided a W x + (1-a)S    | guide rows sharded, S as above | guide columns sharded, S as above  |

Blocks are sharded whole, so tp must divide the number of blocks. Block-shuffle's interleaved output (row s
of block j is output s*B + j) makes a contiguous slice of y the same rows of every W2 block, hence W2 is
sharded by rows there, and tp must divide each block's rows and middle features too. MoE layers keep their experts whole on
every tensor-parallel rank (expert parallelism shards them instead); their input is gathered along the
sequence under sequence parallelism.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from pretrain.models.structured import BlockDenseLinear, BlockShuffleLinear, LowRankLinear, SelfGuided
from pretrain.torch_compat import style_io_fns

COLUMN = {LowRankLinear: {"V": Replicate(), "U": Shard(0)},
          BlockDenseLinear: {"V": Replicate(), "U": Shard(0)},
          BlockShuffleLinear: {"W1": Replicate(), "W2": Shard(1)},
          SelfGuided: {"guide": Shard(0)}}
ROW = {LowRankLinear: {"V": Shard(1), "U": Replicate()},
       BlockDenseLinear: {"V": Shard(0), "U": Shard(1)},
       BlockShuffleLinear: {"W1": Shard(0), "W2": Replicate()},
       SelfGuided: {"guide": Shard(1)}}


def _shard_by_table(table: dict):
    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        placements = table.get(type(module), {})
        for pname, param in list(module.named_parameters(recurse=False)):
            dist = distribute_tensor(param.data, mesh, [placements.get(pname, Replicate())])
            module.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))
    return partition


def _structured_apply(style, module: nn.Module, mesh: DeviceMesh, table: dict) -> nn.Module:
    input_fn, output_fn = style_io_fns(style)
    return distribute_module(module, mesh, _shard_by_table(table), input_fn, output_fn)


class StructuredColwise(ColwiseParallel):
    """ColwiseParallel for a structured (or self-guided) linear: the factors shard by ``COLUMN``."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return _structured_apply(self, module, device_mesh, COLUMN)


class StructuredRowwise(RowwiseParallel):
    """RowwiseParallel for a structured (or self-guided) linear: the factors shard by ``ROW``."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)  # the input arrives sharded on its features
        return _structured_apply(self, module, device_mesh, ROW)


def _column(linear: nn.Module, **kw):
    return ColwiseParallel(**kw) if isinstance(linear, nn.Linear) else StructuredColwise(**kw)


def _row(linear: nn.Module, **kw):
    return RowwiseParallel(**kw) if isinstance(linear, nn.Linear) else StructuredRowwise(**kw)


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool) -> None:
    """Shard ``model`` (a plain Transformer with real weights) over the 1-D tensor-parallel ``mesh``."""
    seq = Shard(1) if sequence_parallel else Replicate()
    top = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                use_local_output=not loss_parallel),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    parallelize_module(model, mesh, top)
    for block in model.blocks.values():
        plan: dict = {
            "attn": PrepareModuleInput(input_layouts=(seq, None), desired_input_layouts=(Replicate(), None),
                                       use_local_output=True),
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            for name in ("attn_norm", "ffn_norm", "attn_post_norm", "ffn_post_norm"):
                if hasattr(block, name):
                    plan[name] = SequenceParallel()
        if block.is_moe:
            plan["ffn"] = _moe_io(seq)
        else:
            ffn = block.ffn
            plan["ffn"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                             use_local_output=True)
            for name in ("gate_proj", "up_proj"):
                if hasattr(ffn, name):
                    plan[f"ffn.{name}"] = _column(getattr(ffn, name))
            plan["ffn.down_proj"] = _row(ffn.down_proj, output_layouts=seq)
        parallelize_module(block, mesh, plan)
    model.tie_weights()  # embed and head shard the same way (vocab rows), so one DTensor serves both


def _moe_io(seq):
    """MoE keeps whole experts on each tensor-parallel rank: gather its input, re-shard its output."""
    return PrepareModuleInputOutput(input_layouts=(seq, None), desired_input_layouts=(Replicate(), None),
                                    use_local_input=True, output_layouts=(Replicate(),),
                                    desired_output_layouts=(seq,), use_local_output=True)
