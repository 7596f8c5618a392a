"""Speed switches applied to a plain model from outside, as torchtitan does (models stay plain):
activation checkpointing per block, regional ``torch.compile`` per block, and the torch profiler.

Neither wrapper changes a parameter name (no ``_checkpoint_wrapped_module.`` or ``_orig_mod.`` prefixes):
activation checkpointing uses the composable ``torch.distributed._composable.checkpoint`` (forward hooks),
compilation uses ``nn.Module.compile`` (in place). Checkpoints, optimizer groups and parallel plans therefore
see the same names whichever switches are on.

Under a split-backward pipeline schedule (2BP, METHODS.md section 6) two backward passes walk each block's
graph: the input backward I (``autograd.grad`` to the stage input, graph retained), later the weight backward W.
torch's non-reentrant checkpoint (2.13) recomputes per backward pass and frees each recomputed tensor at its
first unpack, with ``retain_graph`` too (Rule 4 of its notes): W would recompute the block again, once per
parameter group, which the composable API cannot (its recompute context is single-use) and selective
checkpointing refuses. Its ``GraphExecGroup`` recomputes once for several passes, but only if no saved tensor is
unpacked twice, and the nodes where a weight path leaves the input path (every linear's ``mm``) run in both I and
W, unpacking all their saved tensors each time. So these schedules use ``RetainedCheckpoint`` below: the same
hooks, with each recomputed tensor kept until the graph that saved it lets go (the alternative Rule 4 describes).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
    get_device_states,
    set_device_states,
)

from pretrain.config import TrainConfig
from pretrain.models.moe import grouped_mm_works, moe_layers

_aten = torch.ops.aten
# Selective checkpointing keeps what is expensive to recompute: the outputs of matmuls (every linear),
# grouped expert GEMMs and attention; norms, activations, RoPE and the residual adds are recomputed.
_SAVED_OPS = {getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu") if hasattr(_aten, name)}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str, split_backward: bool = False) -> None:
    """Recompute each block's activations in backward: ``full`` keeps only the block inputs, ``selective``
    also keeps matmul and attention outputs. ``split_backward``: the pipeline splits each backward into an
    input and a weight pass, which share one recomputation (``RetainedCheckpoint``). Apply before FSDP wraps
    the blocks."""
    if mode == "none":
        return
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls) if mode == "selective" else None
    for block in model.blocks.values():
        if split_backward:
            RetainedCheckpoint(block, context_fn)
        else:
            checkpoint(block, context_fn=context_fn)


class _Handle:
    """What autograd's graph holds in place of one tensor saved by a checkpointed forward. Nothing else holds
    it, so it dies when the graph does, or when a backward without ``retain_graph`` releases that tensor."""


class _RecomputationDone(Exception):
    """Raised once the recomputation has reproduced every saved tensor: the rest of the forward is skipped."""


class RetainedCheckpoint:
    """Activation checkpointing of ``block`` whose recomputation serves every backward pass over the graph.

    Forward (forward hooks, so parameter names do not change): each tensor autograd saves becomes a
    ``_Handle``. The first unpack, by whichever backward pass comes first (I under 2BP), runs the block's
    forward again on the detached inputs, with the RNG and autocast state of the forward and ``context_fn``'s
    recompute context (selective checkpointing), and stops once every saved tensor is back. The recomputed
    tensors live in a dictionary weakly keyed by the handles: later unpacks (W) read them, and each one goes
    when the graph releases its handle, that is when a backward without ``retain_graph`` (W, or a whole B) has
    run its node, or when the graph is freed. A block is recomputed at most once per forward."""

    def __init__(self, block: nn.Module, context_fn: Callable | None = None):
        self.block, self.context_fn = block, context_fn
        self.recomputing = False
        self.forward_contexts = contextlib.ExitStack()
        block.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        block.register_forward_hook(self._after_forward, prepend=True, always_call=True)

    def _before_forward(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.recomputing or not torch.is_grad_enabled():
            return
        forward_context, recompute_context = self.context_fn() if self.context_fn else (contextlib.nullcontext(),) * 2
        saved = _SavedActivations(self, args, kwargs, recompute_context)
        self.forward_contexts.enter_context(torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack))
        self.forward_contexts.enter_context(forward_context)

    def _after_forward(self, block: nn.Module, args: tuple, output) -> None:
        if not self.recomputing:
            self.forward_contexts.close()


class _SavedActivations:
    """The saved tensors of one checkpointed forward: handles while they are not needed, recomputed once."""

    def __init__(self, checkpoint: RetainedCheckpoint, args: tuple, kwargs: dict, recompute_context):
        self.checkpoint, self.kwargs, self.recompute_context = checkpoint, kwargs, recompute_context
        self.args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                          for a in args)
        self.device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        self.cpu_rng = torch.get_rng_state()
        self.device_ids, self.device_rngs = get_device_states(*args)
        self.autocast = [dict(device_type=t, enabled=torch.is_autocast_enabled(t), dtype=torch.get_autocast_dtype(t),
                              cache_enabled=torch.is_autocast_cache_enabled()) for t in {"cpu", self.device_type}]
        self.handles: list[tuple[weakref.ref[_Handle], torch.Size, torch.dtype]] = []
        self.recomputed: weakref.WeakKeyDictionary[_Handle, torch.Tensor] | None = None

    def pack(self, tensor: torch.Tensor) -> _Handle:
        handle = _Handle()
        self.handles.append((weakref.ref(handle), tensor.shape, tensor.dtype))
        return handle

    def unpack(self, handle: _Handle) -> torch.Tensor:
        if self.recomputed is None:
            self._recompute()
        return self.recomputed[handle]

    def _recompute(self) -> None:
        recomputed: weakref.WeakKeyDictionary[_Handle, torch.Tensor] = weakref.WeakKeyDictionary()
        count = 0

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal count
            # Detached: a tensor saved by the op that made it would otherwise hold its own grad_fn, a cycle
            # through C++ that the garbage collector cannot see (as torch's checkpoint does).
            tensor = tensor.detach()
            ref, shape, dtype = self.handles[count]
            if (tensor.shape, tensor.dtype) != (shape, dtype):
                raise RuntimeError(f"activation checkpointing: saved tensor {count} of the recomputed forward is "
                                   f"{tuple(tensor.shape)} {tensor.dtype}, the forward's {tuple(shape)} {dtype}; "
                                   "the block must run the same ops both times")
            handle = ref()
            if handle is not None:  # else the graph has already released it
                recomputed[handle] = tensor
            count += 1
            if count == len(self.handles):
                raise _RecomputationDone
            return tensor

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.device_ids, device_type=self.device_type))
            torch.set_rng_state(self.cpu_rng)
            set_device_states(self.device_ids, self.device_rngs, device_type=self.device_type)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor))
            stack.enter_context(torch.enable_grad())
            for kwargs in self.autocast:
                stack.enter_context(torch.autocast(**kwargs))
            stack.enter_context(self.recompute_context)
            self.checkpoint.recomputing = True
            stack.callback(setattr, self.checkpoint, "recomputing", False)
            try:
                self.checkpoint.block(*self.args, **self.kwargs)
            except _RecomputationDone:
                self.recomputed = recomputed
        if self.recomputed is None:
            raise RuntimeError(f"activation checkpointing: the recomputed forward saved {count} tensors, the "
                               f"forward {len(self.handles)}; the block must run the same ops both times")


def apply_compile(model: nn.Module, enabled: bool, precision: str) -> None:
    """Regional compilation: each block compiled in place. Blocks share their code, so one graph serves
    all of them and compile time does not grow with depth. Compiled ``torch._grouped_mm`` takes bf16 only
    (torch 2.13), so in fp32 the MoE layers run their experts with the per-expert loop. Whether the grouped
    GEMM runs at all is probed here, eagerly: traced inside the graph, the probe (a forward and backward)
    would break the graph and run again on every forward."""
    if not enabled:
        return
    for layer in moe_layers(model):
        if layer.experts is None and layer.grouped:
            w = layer.w_up  # (experts, out, in); a DTensor's device is its local shard's
            layer.grouped = precision == "bf16" and grouped_mm_works(w.device.type, torch.bfloat16, w.shape[-1],
                                                                     w.shape[-2])
    for block in model.blocks.values():
        block.compile()


def compile_loss(loss_fn: Callable, enabled: bool) -> Callable:
    """The loss compiled as well: upcasting the logits, log-softmax and picking the label's log-probability
    fuse into one pass over the (tokens x vocab) logits, forward and backward, instead of several."""
    return torch.compile(loss_fn) if enabled else loss_fn


class StepProfiler:
    """``torch.profiler`` over a few optimizer steps: 1 skipped, 1 warm-up, then ``steps`` recorded. The
    trace goes to ``RUN_DIR/profile`` (tensorboard's profile plugin, or Perfetto, opens it); a run that ends
    inside the recorded window writes what it has."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int, device: torch.device):
        self.prof = None
        if not cfg.profile:
            return
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        once = schedule(wait=1, warmup=1, active=cfg.profile_steps, repeat=1)  # repeat=0 would cycle all run long
        self.prof = profile(activities=activities, schedule=once,
                            on_trace_ready=tensorboard_trace_handler(str(run_dir / "profile"), f"rank{rank}"),
                            record_shapes=True, profile_memory=True, acc_events=True)

    def start(self) -> None:
        if self.prof is not None:
            self.prof.start()

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
