"""Activation checkpointing applied to a plain model from outside (models stay plain): each block's activations
are recomputed in backward, whole (``full``) or all but the matmul and attention outputs (``selective``).

The wrapper changes no parameter name (no ``_checkpoint_wrapped_module.`` prefix): it is the composable
checkpoint (forward hooks), so checkpoints, optimizer groups and parallel plans see the same names whichever
switches are on. Split-backward pipeline schedules use ``RetainedCheckpoint`` instead (``retained_checkpoint.py``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from pretrain.parallel.retained_checkpoint import RetainedCheckpoint
from pretrain.torch_compat import composable_checkpoint

_aten = torch.ops.aten
# Selective checkpointing keeps what is expensive to recompute: the outputs of matmuls (every linear),
# grouped expert GEMMs and attention; norms, activations, RoPE and the residual adds are recomputed.
_SAVED_OPS = {getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu") if hasattr(_aten, name)}


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy: keep matmul and attention outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str, split_backward: bool = False) -> None:
    """Recompute each block's activations in backward: ``full`` keeps only the block inputs, ``selective``
    also keeps matmul and attention outputs. ``split_backward``: the pipeline splits each backward into an
    input and a weight pass, which share one recomputation (``RetainedCheckpoint``). Apply before FSDP wraps
    the blocks."""
    if mode == "none":
        return
    context_fn = functools.partial(create_selective_checkpoint_contexts, save_matmuls) if mode == "selective" else None
    for block in model.blocks.values():
        if split_backward:
            RetainedCheckpoint(block, context_fn)
        else:
            composable_checkpoint(block, context_fn=context_fn)
