"""The language-model loss every engine trains and evaluates with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from pretrain.data.loader import MicroBatch


def lm_loss_sum(logits: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Sum of the masked next-token cross-entropy; labels are already shifted, so logits are not sliced.
    Vocab-sharded logits (a DTensor, under ``loss_parallel``) are never gathered."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none")
    if isinstance(losses, DTensor):
        losses = losses.to_local()  # one loss per token, replicated over the tensor-parallel ranks
    return (losses * batch.loss_mask.flatten()).sum()
