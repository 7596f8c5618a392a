"""Every private PyTorch name the stack uses, in one place, and the torch versions it runs with.

Private names change between torch releases without notice. Keeping them here means an upgrade is checked in
one file: each entry says what it is for and which public API would replace it once torch has one. Nothing
else in ``pretrain/`` imports a private torch module or touches a private attribute.

Tested: torch 2.11 (CUDA, one H100) and 2.13 (CPU, the test suite). An older torch is refused at start-up
(``check_torch_version``): it was never run with this stack, and the private names below are known to have
moved between releases.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F

# Activation checkpointing through forward hooks, so parameter names keep no wrapper prefix. The public
# ``torch.utils.checkpoint.checkpoint`` is a function, and ``checkpoint_wrapper`` renames parameters.
from torch.distributed._composable import checkpoint as composable_checkpoint

# The differentiable all-to-all with uneven splits of expert parallelism (torch.distributed.nn has an
# all_to_all_single too, but it is not traceable by torch.compile).
from torch.distributed._functional_collectives import all_to_all_single_autograd

# Setting a value deep in a nested state dict by its flattened path, as DCP's own load planner does.
from torch.distributed.checkpoint._traverse import set_element as set_nested_element

# Pipelining. The runtime that executes per-rank action lists (our 2BP orders and merged W actions need it;
# the public schedule classes take no custom order), its action and context types, and its order check.
# The split backward of one stage (input part, then weight part) is public only inside the schedules.
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
from torch.distributed.pipelining.schedules import _Action as Action
from torch.distributed.pipelining.schedules import _PipelineContext as PipelineContext
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime as ScheduleRuntime
from torch.distributed.pipelining.schedules import _validate_schedule as validate_schedule

# FSDP2 + tensor parallelism shard one dim twice (a strided shard); gradient norms must treat it as a shard.
from torch.distributed.tensor.placement_types import _StridedShard as StridedShard

# Flattening of pytrees (``torch.utils._pytree``; no public module in 2.13).
from torch.utils._pytree import tree_leaves

__all__ = ["Action", "PipelineContext", "ScheduleRuntime", "StridedShard", "all_to_all_single_autograd",
           "check_torch_version", "composable_checkpoint", "defer_weight_backward", "flatten_mesh", "grouped_mm",
           "load_actions", "pop_deferred_weight_backward", "pop_forward_cache", "rank_actions", "received_grads",
           "run_microbatches", "runtime_stages", "set_nested_element", "set_rank_actions", "stage_backward_input", "stage_backward_weight",
           "style_io_fns", "tree_leaves", "validate_schedule"]

MIN_TORCH = (2, 11)
TESTED_TORCH = "2.11 (GPU) and 2.13 (CPU)"

# The MoE experts' grouped GEMM: public as ``torch.nn.functional.grouped_mm`` in recent releases (2.13 has it).
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def check_torch_version(version: str = torch.__version__) -> None:
    """Refuse a torch older than the oldest one this stack was run with, naming the fix."""
    if torch_version(version) < MIN_TORCH:
        from pretrain.errors import UserError

        raise UserError(f"torch {version} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}, the oldest this stack runs "
                        f"with (tested with {TESTED_TORCH}); install a newer one, e.g. pip install torch==2.13.0 "
                        "(CPU) or a CUDA build of 2.11 or later.")


def style_io_fns(style) -> tuple:
    """The input and output layout functions of a Colwise/RowwiseParallel style, bound to its layouts, to
    distribute a module whose parameters that style cannot shard itself (``parallel/tensor.py``; custom styles
    override the ``_apply`` hook of ``ParallelStyle``, torch's way to write one)."""
    return (partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
            partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))


def flatten_mesh(mesh, dims: tuple[str, ...], name: str) -> None:
    """A named flattened dimension of a DeviceMesh (torchtitan does the same; public API pending)."""
    mesh[dims]._flatten(name)


# ---- the internals of a pipeline stage and of the schedule runtime ------------------------------------------

def load_actions(runtime: ScheduleRuntime, order: dict[int, list]) -> None:
    """Give the runtime our per-rank compute actions; it adds the sends and receives."""
    runtime._prepare_schedule_with_comms(order)


def rank_actions(runtime: ScheduleRuntime, rank: int) -> list:
    return runtime.pipeline_order_with_comms[rank]


def set_rank_actions(runtime: ScheduleRuntime, rank: int, actions: list) -> None:
    runtime.pipeline_order_with_comms[rank] = actions


def runtime_stages(runtime: ScheduleRuntime) -> list:
    return runtime._stages


def run_microbatches(runtime: ScheduleRuntime, args: list[tuple], kwargs: list[dict], targets: list) -> None:
    """One step of the schedule over microbatches already split (the public ``step`` splits a batch itself)."""
    runtime._step_microbatches(args, kwargs, targets, None, return_outputs=False)


def pop_forward_cache(stage, microbatch: int) -> tuple:
    """(stage output, flattened input values) kept by the stage's forward of ``microbatch``."""
    return stage.fwd_cache.pop(microbatch)


def received_grads(stage, microbatch: int):
    """The output gradients the next stage sent for ``microbatch``."""
    return stage._retrieve_recv_grads(microbatch)


def defer_weight_backward(stage, microbatch: int, state: tuple) -> None:
    """Keep what the weight backward of ``microbatch`` needs, where the stage's W action looks for it."""
    stage.backward_state[microbatch] = state
    stage.dw_runner[microbatch] = lambda: None


def pop_deferred_weight_backward(stage, microbatch: int) -> tuple:
    stage.dw_runner.pop(microbatch)
    return stage.backward_state.pop(microbatch)


def profiled_cpu_allocations(prof) -> list[tuple[int, int]]:
    """(time ns, bytes: + allocated, - freed) of every CPU allocation event a ``torch.profiler.profile(
    profile_memory=True)`` recorded, in time order (the measurement `pretrain plan` is checked against,
    ``plan/validate.py``). The profiler's event tree is private (``kineto_results.experimental_event_tree`` and
    ``_EventType``); the public ``export_memory_timeline`` categorises tensors but asserts on DTensor graphs."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    return sorted(events)
