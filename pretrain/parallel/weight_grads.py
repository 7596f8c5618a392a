"""Deferred weight gradients batched over microbatches (``parallel.pp_batch_weight_grads``, docs/parallelism.md).

A linear map y = x W^T has the weight gradient dW = dy^T x, summed over the tokens. Over microbatches 1..k
that sum is one GEMM on the stacked tokens, [dy_1; ...; dy_k]^T [x_1; ...; x_k], in place of k thinner ones.

``LinearWeightGrads`` watches a stage's forward through a ``TorchFunctionMode`` and keeps every
``F.linear(x, W)`` whose W is a parameter: the input x (autograd holds it for the weight gradient anyway),
and through a hook on the output, dy when the input backward computes it. That covers whatever reaches a
parameter through ``F.linear``, not only ``nn.Linear`` modules: attention and FFN projections, the LM head
(tied or not), the MoE router, shared experts, and the factors of the structured FFNs that are plain linear
maps (low-rank U and V, block-dense U, the self-guided guide). A parameter the forward also uses in any
other differentiable op (an einsum, an index, a cast to another dtype: block-diagonal factors, stacked
experts, norms, embeddings) is left to the per-microbatch autograd weight backward, and so is one used
in no ``F.linear`` at all. A weight used by several ``F.linear`` calls gets one GEMM over all of them.

The tensors are the ones the forward saw, so the layouts come along: under tensor parallelism x, dy and W
are DTensors (the parallel styles' hooks run around ``F.linear``, so x is already gathered for a
column-parallel layer, dy of a row-parallel one arrives whole even under sequence parallelism) and the GEMM
runs as a DTensor op. Its result is brought to W's placements: already there for the sharded projections
and the vocab-parallel head (no communication); a replicated factor (low-rank V of a column-parallel
layer, U of a row-parallel one) gets a partial sum, all-reduced once per W action, where autograd would
leave it partial for the optimizer to reduce. Under FSDP (sharded or replicated), W is the unsharded
parameter the forward used, whose ``.grad`` FSDP reduces at the end of the schedule, as it does autograd's.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from pretrain.torch_compat import tree_leaves


@dataclass(eq=False)
class LinearCall:
    """One ``F.linear(x, weight)`` of a microbatch's forward: its input, and its output gradient once caught."""

    weight: nn.Parameter
    x: torch.Tensor | None
    dy: torch.Tensor | None = None


def _parameters(args: tuple, kwargs: dict) -> list[nn.Parameter]:
    """The parameters among a torch call's arguments (cheap: most calls have none and no nesting)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, nn.Parameter):
            found.append(a)
        elif isinstance(a, (list, tuple, dict)):
            found += [t for t in tree_leaves(a) if isinstance(t, nn.Parameter)]
    return found


class _WatchForward(TorchFunctionMode):
    """Hands every torch call of a forward, with its result, to ``LinearWeightGrads._record``."""

    def __init__(self, owner: LinearWeightGrads):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            self.owner._record(func, args, kwargs, out)
        return out


class LinearWeightGrads:
    """The batched weight gradients of one pipeline stage: ``forward`` and ``input_backward`` wrap the
    stage's F and I of a microbatch, ``batched`` names the weights the stage leaves out of its autograd
    weight backward, ``run`` is the W of several microbatches."""

    def __init__(self):
        self.calls: dict[int, list[LinearCall]] = defaultdict(list)  # microbatch -> its F.linear calls on parameters
        self.elsewhere: dict[int, set[int]] = defaultdict(set)  # microbatch -> ids of parameters used otherwise
        self.microbatch: int | None = None  # the microbatch being forwarded
        self.catching: int | None = None  # the microbatch whose input backward is running
        self._mode = _WatchForward(self)

    @contextmanager
    def forward(self, microbatch: int):
        self.microbatch = microbatch
        try:
            with self._mode:
                yield
        finally:
            self.microbatch = None

    @contextmanager
    def input_backward(self, microbatch: int):
        """The I of ``microbatch``: its batched calls catch dy; the others let go of their inputs."""
        batched = self.batched(microbatch)
        for call in self.calls.get(microbatch, []):
            if id(call.weight) not in batched:
                call.x = None
        self.catching = microbatch
        try:
            yield
        finally:
            self.catching = None

    def batched(self, microbatch: int) -> set[int]:
        """ids of the weights whose gradient ``run`` computes for ``microbatch``."""
        return {id(c.weight) for c in self.calls.get(microbatch, [])} - self.elsewhere.get(microbatch, set())

    def _record(self, func, args: tuple, kwargs: dict, out) -> None:
        mb = self.microbatch
        if mb is None:
            return
        params = _parameters(args, kwargs)
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if isinstance(weight, nn.Parameter) and weight.requires_grad and x.requires_grad:
                call = LinearCall(weight, x)
                self.calls[mb].append(call)
                out.register_hook(lambda grad, call=call, mb=mb: self._catch(call, mb, grad))
                params = [t for t in params if t is not weight]  # a bias stays with autograd
        if not params:
            return
        outputs = tree_leaves(out)
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in outputs):
            return  # no differentiable use (a shape, a detached view)
        for t in params:  # another differentiable use; an op returning the parameter itself (fp32 ``w.float()``) is none
            if not any(o is t for o in outputs):
                self.elsewhere[mb].add(id(t))

    def _catch(self, call: LinearCall, mb: int, grad: torch.Tensor) -> None:
        if self.catching == mb and call.x is not None and call.dy is None:
            call.dy = grad

    def drop(self, microbatch: int) -> None:
        for call in self.calls.pop(microbatch, []):  # the output hooks keep the calls as long as the graph lives
            call.x = call.dy = None
        self.elsewhere.pop(microbatch, None)

    @torch.no_grad()
    def run(self, microbatches: list[int]) -> None:
        """Accumulate dW = dy^T x over ``microbatches`` into every batched weight's ``.grad``: one GEMM per weight."""
        stacked: dict[int, tuple[nn.Parameter, list, list]] = {}
        for mb in microbatches:
            for call in self.calls.get(mb, []):
                if call.dy is not None:  # None: not batched, or its output got no gradient
                    _, xs, dys = stacked.setdefault(id(call.weight), (call.weight, [], []))
                    xs.append(call.x.reshape(-1, call.x.shape[-1]))
                    dys.append(call.dy.reshape(-1, call.dy.shape[-1]))
            self.drop(mb)
        for weight, xs, dys in stacked.values():
            dy = torch.cat(dys)
            dw = dy.t() @ torch.cat(xs).to(dy.dtype)
            if isinstance(dw, DTensor) and tuple(dw.placements) != tuple(weight.placements):
                dw = dw.redistribute(weight.device_mesh, weight.placements)
            dw = dw.to(weight.dtype)
            if weight.grad is None:
                weight.grad = dw
            else:
                weight.grad += dw
