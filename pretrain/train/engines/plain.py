"""The plain engine: every rank runs the model's whole depth. One process, or FSDP2 / DDP / HSDP data
parallelism, tensor (+ sequence) parallelism and expert parallelism, alone or combined."""

from __future__ import annotations

import torch
from torch import nn

from pretrain import device as devices
from pretrain.config import RunConfig
from pretrain.data.loader import MicroBatch
from pretrain.generate import last_logits
from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
from pretrain.parallel.mesh import ParallelDims
from pretrain.parallel.plan import finish_gradients, parallelize
from pretrain.train.engines.base import Engine


class PlainEngine(Engine):
    """``model``: a model to train instead of the config's (called as ``model(tokens, moe=...) -> logits``; the
    benchmark trains a transformers model this way), used as given: no activation checkpointing or layout."""

    def __init__(self, cfg: RunConfig, dims: ParallelDims, device: torch.device, start_step: int = 0,
                 model: nn.Module | None = None):
        super().__init__(cfg, dims, device)
        if model is None:
            model = self.build_model(start_step)
            apply_activation_checkpointing(model, cfg.train.activation_checkpointing)  # before FSDP
            parallelize(model, dims, cfg)
        self.model = model
        self.prepare()

    def forward_backward(self, micro_batches: list[MicroBatch], measure: bool = False) -> torch.Tensor:
        """Gradient accumulation over this rank's micro-batches; each one's loss is its share of the global token
        mean, so the accumulated gradient is the gradient of that mean."""
        n_tokens = self.global_tokens(micro_batches)
        loss_total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device)
            with self.loss_context():
                with devices.autocast(self.device, self.cfg.train.precision):
                    logits = self.model(mb.tokens, moe=self.moe)
                loss = self.loss_sum(logits, mb) / n_tokens
                (loss * self.grad_scale).backward()
            loss_total += loss.detach()
        finish_gradients(self.model, self.dims, self.cfg)
        return loss_total

    def eval_loss_sum(self, mb: MicroBatch) -> torch.Tensor:
        with self.loss_context(), devices.autocast(self.device, self.cfg.train.precision):
            return self.loss_sum(self.model(mb.tokens), mb)

    @torch.no_grad()
    def next_token_logits(self, context: torch.Tensor) -> torch.Tensor:
        with devices.autocast(self.device, self.cfg.train.precision):
            return last_logits(self.model(context))
