"""Regional ``torch.compile``: each block compiled in place (``nn.Module.compile``, so no ``_orig_mod.`` prefix in
parameter names), after the parallel layout is applied, and the loss compiled alongside."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def apply_compile(model: nn.Module, enabled: bool) -> None:
    """Each block compiled in place. Blocks share their code, so one graph serves all of them and compile time
    does not grow with depth. Decide the MoE kernels first (``models.moe.use_grouped_gemm``): the graph then
    contains no probe."""
    if not enabled:
        return
    for block in model.blocks.values():
        block.compile()


def compile_loss(loss_fn: Callable, enabled: bool) -> Callable:
    """The loss compiled as well: upcasting the logits, log-softmax and picking the label's log-probability
    fuse into one pass over the (tokens x vocab) logits, forward and backward, instead of several."""
    return torch.compile(loss_fn) if enabled else loss_fn
