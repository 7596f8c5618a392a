"""Activation checkpointing for the split-backward pipeline schedules (2BP, ``pipeline.py``).

Under a split-backward pipeline schedule two backward passes walk each block's
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
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states


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
