"""Pipeline parallelism: the model's stages (``stages.py``) run under a schedule (docs/parallelism.md).

Each stage is a ``StageModule`` inside a torch ``PipelineStage``; every schedule runs on torch's schedule
runtime from the action lists of ``schedules.py`` (the runtime and the stage internals it needs are private
torch names, reached through ``torch_compat``). An input-backward action (I) runs torch's
``stage_backward_input``: ``autograd.grad`` to the stage input only, so autograd skips every weight-gradient
GEMM (each op computes only the gradients a backward pass needs: true for our structured FFNs and MoE experts
too, which use ordinary ops) and no parameter's ``.grad`` changes; the weight-backward action (W) then runs
from the gradients saved at the nodes where the weight paths leave the input path. The first stage sends no
input gradient; its I still goes down to the embedding output, so that its W holds only weight gradients
(torch would run its whole backward in W). ``weight_grads.py`` batches consecutive Ws.

``PipelineSchedule`` is what pipelining adds to a training step; the step itself (loss, clipping, optimizer)
is the pipeline engine's (``train/engines/pipeline.py``): the schedule over a step's microbatches with the
engine's loss function on the last stage, the tied embedding's two gradient parts (first and last stage)
summed over the two ranks, forward-only passes for evaluation and sampling, and the measured bubble.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import BACKWARD_WEIGHT, RECV_B, RECV_F
from torch.distributed.tensor import DTensor

from pretrain import device as devices
from pretrain import torch_compat as compat
from pretrain.config import RunConfig
from pretrain.generate import last_logits
from pretrain.models.moe import MoEContext
from pretrain.parallel import plan, schedules
from pretrain.parallel.mesh import ParallelDims
from pretrain.parallel.stages import split_model
from pretrain.parallel.weight_grads import LinearWeightGrads


class ActionClock:
    """Wall time of this rank's compute actions in one step, when ``enabled`` (a device sync per action)."""

    def __init__(self, device: torch.device):
        self.device, self.enabled = device, False
        self.reset()

    def reset(self) -> None:
        self.busy, self.seconds, self.count = 0.0, dict.fromkeys("FBIW", 0.0), dict.fromkeys("FBIW", 0)

    @contextmanager
    def __call__(self, kind: str, actions: int = 1):
        if not self.enabled:
            yield
            return
        devices.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            devices.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.busy += dt
            self.seconds[kind] += dt
            self.count[kind] += actions


class Stage(PipelineStage):
    """torch's PipelineStage with each compute action timed, the first stage's backward split like the others,
    and (with ``weight_grads``) the linear layers' weight gradients deferred to batched W actions.

    torch leaves the first stage's I empty and runs its whole backward in W, so the first stage's input
    gradient GEMMs would all wait for its Ws. Here its I goes down to the embedding output, as every other
    stage's goes down to its input, and its W computes the weight gradients, the embedding's last."""

    def __init__(self, *args, clock: ActionClock, weight_grads: LinearWeightGrads | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.weight_grads = clock, weight_grads
        self.embedded: dict[int, torch.Tensor] = {}  # first stage: each microbatch's embedding output
        self.backward_chunk: int | None = None  # the microbatch whose I or W runs

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        watch = self.weight_grads.forward(fwd_chunk_id) if self.weight_grads is not None else nullcontext()
        with self.clock("F"), watch:
            output = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        if self.is_first and self.has_backward:
            self.embedded[fwd_chunk_id], self.submod.embedded = self.submod.embedded, None
        return output

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward=False):
        self.backward_chunk = bwd_chunk_id
        embedded = self.embedded.pop(bwd_chunk_id, None)
        catch = (self.weight_grads.input_backward(bwd_chunk_id) if self.weight_grads is not None and not full_backward
                 else nullcontext())
        with self.clock("B" if full_backward else "I"), catch:
            if self.is_first and not full_backward and self.has_backward:
                self._first_input_backward(bwd_chunk_id, embedded)
            else:
                super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        if self.weight_grads is not None and full_backward:
            self.weight_grads.drop(bwd_chunk_id)

    def _first_input_backward(self, mb: int, embedded: torch.Tensor) -> None:
        stage_output, _ = compat.pop_forward_cache(self, mb)
        output_grads = compat.received_grads(self, mb)
        with warnings.catch_warnings():  # torch reads .grad of the input, here a non-leaf: it stays unused
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            (grad,), groups = self.backward_maybe_with_nosync(
                "input", {"stage_output": stage_output, "output_grads": output_grads, "input_values": [embedded]})
        compat.defer_weight_backward(self, mb, ([embedded, grad], groups, stage_output, output_grads))

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward=False):
        with self.clock("W"):
            self.backward_weights([bwd_chunk_id], last_backward)

    def backward_weights(self, microbatches: list[int], last_backward: bool = False) -> None:
        """The W action of several microbatches: autograd's weight backward of each, then the batched GEMMs."""
        for mb in microbatches:
            self.backward_chunk = mb
            if not self.is_first:
                super().backward_weight_one_chunk(mb, last_backward)
                continue
            (embedded, grad), groups, _, _ = compat.pop_deferred_weight_backward(self, mb)
            self.backward_maybe_with_nosync("weight", {"param_groups": groups})
            torch.autograd.backward(embedded, grad)  # the embedding weight's gradient
        if self.weight_grads is not None:
            self.weight_grads.run(microbatches)

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict, last_backward: bool = False):
        """The split backward over the parameters autograd handles here (not the embedding, which W runs from
        the embedding output's gradient, nor batched linear weights); FSDP reduces once, at REDUCE_GRAD."""
        if backward_type == "full":
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        if isinstance(self.submod, FSDPModule):  # what torch's own split backward sets
            self.submod.set_is_last_backward(False)
            self.submod.set_reshard_after_backward(False)
            self.submod.set_requires_gradient_sync(False)
        skip = {id(m.weight) for m in self.submod.modules() if isinstance(m, nn.Embedding)} if self.is_first else set()
        if self.weight_grads is not None:
            skip |= self.weight_grads.batched(self.backward_chunk)
        params = [p for p in self.submod.parameters() if id(p) not in skip]
        if backward_type == "input":
            return compat.stage_backward_input(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"],
                                               bwd_kwargs["input_values"], iter(params))
        return compat.stage_backward_weight(iter(params), bwd_kwargs["param_groups"]), None


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def merge_weight_actions(actions: list[compat.Action]) -> list[compat.Action]:
    """Fold each run of W actions of one stage into one W whose sub-actions list the microbatches. Receives
    posted between them move ahead of the merged W (a receive is only posted early, never waited on here)."""
    merged: list[compat.Action] = []
    i = 0
    while i < len(actions):
        action = actions[i]
        if action.computation_type != BACKWARD_WEIGHT:
            merged.append(action)
            i += 1
            continue
        run, moved, i = [action], [], i + 1
        while i < len(actions):
            nxt = actions[i]
            if nxt.computation_type == BACKWARD_WEIGHT and nxt.stage_index == action.stage_index:
                run.append(nxt)
            elif nxt.computation_type in (RECV_F, RECV_B):
                moved.append(nxt)
            else:
                break
            i += 1
        merged += moved + [compat.Action(action.stage_index, BACKWARD_WEIGHT, action.microbatch_index,
                                   tuple(run) if len(run) > 1 else None)]
    return merged


class PipelineSchedule:
    """This rank's pipeline stages and their schedule: a training step's forward and backward over its
    microbatches, the tied embedding's gradients, and forward-only passes (evaluation, sampling)."""

    def __init__(self, model: nn.Module, dims: ParallelDims, cfg: RunConfig, device: torch.device,
                 moe: MoEContext | None = None):
        p = cfg.parallel
        self.model, self.dims, self.cfg, self.device = model, dims, cfg, device
        self.num_stages = p.pp * schedules.stages_per_rank(p.pp_schedule, p.pp_virtual)
        self.stage_rank = schedules.stage_ranks(p.pp_schedule, p.pp, p.pp_virtual)
        self.local, self.modules = split_model(model, cfg, dims.pp_rank,
                                               lambda: devices.autocast(device, cfg.train.precision), moe)
        self.group = dims.mesh["pp"].get_group()
        self.tie_group, self.tied_copy = self._tie_group() if cfg.model.tie_embeddings else (None, False)
        self.clock = ActionClock(device)
        self.runtime: compat.ScheduleRuntime | None = None
        self.loss_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        self.steps = 0
        self.measured: dict[str, float] = {}

    def _tie_group(self) -> tuple[dist.ProcessGroup | None, bool]:
        """The two ranks holding the tied weight (first and last stage) of this rank's (dp, tp) column, and
        whether this rank's copy is the second one (left out of the gradient norm)."""
        first, last = self.stage_rank[0], self.stage_rank[self.num_stages - 1]
        if first == last:
            return None, False
        grid = self.dims.mesh.mesh.reshape(self.cfg.parallel.pp, -1)
        mine = None
        for column in grid.t().tolist():  # every process creates every group, in the same order
            group = dist.new_group([column[first], column[last]])
            if dist.get_rank() in (column[first], column[last]):
                mine = group
        return mine, self.dims.pp_rank == last

    def _build(self, microbatches: int) -> None:
        p = self.cfg.parallel
        stages = []
        for index, module in zip(self.local, self.modules, strict=True):
            stages.append(Stage(module, index, self.num_stages, self.device, group=self.group, clock=self.clock,
                                weight_grads=LinearWeightGrads() if p.pp_batch_weight_grads else None))
        self.runtime = compat.ScheduleRuntime(stages, microbatches, loss_fn=self._loss, scale_grads=False)
        compat.load_actions(self.runtime, schedules.compute_order(p.pp_schedule, p.pp, microbatches, p.pp_virtual))
        if p.pp_batch_weight_grads:
            rank = self.dims.pp_rank
            compat.set_rank_actions(self.runtime, rank, merge_weight_actions(compat.rank_actions(self.runtime, rank)))
            self.runtime.register_custom_function(BACKWARD_WEIGHT, self._weight_backward)

    def _loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, int(index))

    def _weight_backward(self, action: compat.Action, ctx: compat.PipelineContext) -> None:
        """A W action, or several merged by ``merge_weight_actions``: one batched weight backward."""
        stage = next(s for s in compat.runtime_stages(self.runtime) if s.stage_index == action.stage_index)
        microbatches = [a.microbatch_index for a in action.sub_actions or (action,)]
        with self.clock("W", len(microbatches)):
            stage.backward_weights(microbatches)

    def run(self, tokens: list[torch.Tensor], loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
            measure: bool = False) -> None:
        """Forward and backward of every microbatch (``tokens``: their ids, on this rank's device) under the
        schedule; ``loss_fn(logits, i)`` is microbatch i's loss on the last stage. ``measure``: time every
        compute action of this step (a device sync per action) for ``measured``."""
        self.loss_fn = loss_fn  # the runtime calls the step's own loss function through _loss
        if self.runtime is None:
            self._build(len(tokens))
        # The first step also infers the stage shapes, so it is never timed.
        self.clock.enabled = measure and self.steps > 0
        self.clock.reset()
        for stage in compat.runtime_stages(self.runtime):
            stage.has_backward = True
            stage.clear_runtime_states()
        t0 = time.perf_counter()
        compat.run_microbatches(self.runtime, [(t,) for t in tokens], [{"tokens": t} for t in tokens],
                                [torch.tensor(i) for i in range(len(tokens))])
        if self.clock.enabled:
            devices.synchronize(self.device)
            self._record(time.perf_counter() - t0)
        self.steps += 1

    def _record(self, wall: float) -> None:
        c = self.clock
        self.measured = {"bubble_fraction": 1.0 - c.busy / wall, "peak_memory_mb": devices.peak_memory_mb(self.device)}
        for kind in "FBIW":
            if c.count[kind]:
                self.measured[f"{kind.lower()}_ms"] = 1e3 * c.seconds[kind] / c.count[kind]

    def norm_params(self) -> list[nn.Parameter]:
        """This rank's parameters whose gradients count in the global norm: the tied weight's second copy not."""
        return [p for p in self.model.parameters() if not (self.tied_copy and p is self.model.embed.weight)]

    def sync_tied_grads(self) -> None:
        """Sum the embedding's and the head's gradient of the tied weight on both ranks that hold it; where one
        rank holds both ends (V schedules), average it over data parallelism as FSDP averages the others."""
        for param in plan.shared_params(self.modules) if self.dims.dp_size > 1 else []:  # not FSDP's: see there
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            dist.all_reduce(grad, group=plan.dp_group(self.dims))
            grad.div_(self.dims.dp_size)
        if self.tie_group is None:
            return
        weight = self.model.embed.weight
        grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        if isinstance(grad, DTensor):  # the embedding's gradient may come back in another layout than the head's
            grad = grad.redistribute(weight.device_mesh, weight.placements)
        weight.grad = grad
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tie_group)

    @torch.no_grad()
    def next_token_logits(self, context: torch.Tensor) -> torch.Tensor:
        """``generate``'s logits function: the stages run forward in turn, and the last stage's rank sends the next
        token's logits to every rank of the pipeline, which all draw the same token from them."""
        logits = self.forward_only(context)
        out = last_logits(logits) if logits is not None else torch.empty(self.cfg.model.vocab_size, device=self.device)
        dist.broadcast(out, group=self.group, group_src=self.stage_rank[self.num_stages - 1])
        return out

    def forward_only(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """This rank's stages in order on one microbatch; the logits on the last stage's rank, else None."""
        held: dict[int, torch.Tensor] = {}
        logits = None
        for index, module in zip(self.local, self.modules, strict=True):
            if index == 0:
                h = tokens
            elif index - 1 in held:
                h = held.pop(index - 1)
            else:
                h = self._recv(self.stage_rank[index - 1])
            out = module(h, tokens)
            if index == self.num_stages - 1:
                logits = out
            elif self.stage_rank[index + 1] == self.dims.pp_rank:
                held[index] = out
            else:
                self._send(out, self.stage_rank[index + 1])
        return logits

    def _send(self, tensor: torch.Tensor, rank: int) -> None:
        header = torch.zeros(8, dtype=torch.int64, device=self.device)
        header[:2 + tensor.dim()] = torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape])
        dist.send(header, group=self.group, group_dst=rank)
        dist.send(tensor.contiguous(), group=self.group, group_dst=rank)

    def _recv(self, rank: int) -> torch.Tensor:
        header = torch.zeros(8, dtype=torch.int64, device=self.device)
        dist.recv(header, group=self.group, group_src=rank)
        dtype, ndim, *shape = header.tolist()
        tensor = torch.empty(shape[:ndim], dtype=_DTYPES[dtype], device=self.device)
        dist.recv(tensor, group=self.group, group_src=rank)
        return tensor
