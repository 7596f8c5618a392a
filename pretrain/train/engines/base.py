"""The engine interface: how one global batch becomes one optimizer step, for one way of executing it.

The loop (``train/trainer.py``) is the same for every engine. It hands the engine each step's
micro-batches and reads back two device tensors (the mean token loss and the gradient norm) and ``stepped``
(whether the weights changed); everything between is the engine's:

* ``forward_backward``: forward and backward of every micro-batch of this rank with gradient accumulation,
  the loss weighted by tokens over the whole global batch, the MoE router losses (through ``self.moe``);
* ``clip_gradients``: the global gradient norm over every rank and clipping (one routine for every layout,
  ``parallel/grads.py``);
* ``optimizer_step``, skipped when that norm is not finite; ``evaluate``; ``next_token_logits`` for sampling; ``save_state`` / ``load_state``, the
  engine's part of a checkpoint (model and optimizer; the loop adds its own state, the RNGs and the config);
* ``metrics``: what the engine measured, for the log interval.

``train_step`` strings these together and calls the loop's hooks after the backward and before the optimizer
step. Implementations: ``PlainEngine`` (one process, FSDP2/DDP/HSDP, tensor/sequence and expert parallelism)
and ``PipelineEngine`` (every pipeline schedule). A new way of executing a step implements
``forward_backward``, ``eval_loss_sum`` and ``next_token_logits``, and overrides what else differs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from pretrain.config import RunConfig
from pretrain.data.loader import MicroBatch
from pretrain.models.moe import MoEContext, use_grouped_gemm
from pretrain.models.structured import set_guided_phase
from pretrain.models.transformer import build_model, flops_per_token
from pretrain.parallel.compile import apply_compile, compile_loss
from pretrain.parallel.grads import clip_grads_, grad_norm
from pretrain.parallel.mesh import ParallelDims
from pretrain.parallel.plan import all_reduce_sum, data_parallel_total, dp_group
from pretrain.train import checkpoint, faults
from pretrain.train.engines.loss import lm_loss_sum
from pretrain.train.optim import build_optimizer, remove_params


class StepHooks(Protocol):
    """Where the loop acts inside a step."""

    def after_backward(self) -> None: ...

    def before_optimizer_step(self) -> None: ...


class Engine:
    """See the module docstring. Subclasses set ``model`` (this rank's part, parameters under their global names)
    and call ``prepare`` once it is parallelized."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg: RunConfig, dims: ParallelDims, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        d = cfg.data
        # FSDP averages gradients over data-parallel ranks; each rank's loss is already a share of the global
        # token mean, so scaling it by the dp size turns that average into the sum.
        self.grad_scale = float(dims.dp_size)
        self.loss_parallel = cfg.parallel.tp > 1 and cfg.parallel.loss_parallel
        self.loss_sum = lm_loss_sum
        self.stepped = True  # whether the last step updated the weights (see optimizer_step)
        self.flops_per_token = flops_per_token(cfg.model, d.seq_len)  # training FLOPs of one token, for MFU
        # The model tensors checkpoints keep and their names there (None: all, as named); see checkpoint.save_dcp.
        self.checkpoint_names: Callable[[str], str | None] | None = None
        self.layout_cfg = cfg  # the config the pipeline stages are cut by (an incubation's has its own depth)
        self.moe: MoEContext | None = None
        if cfg.model.moe.num_experts:
            # The router losses are one mean over the units their balance covers: every micro-batch of the global
            # batch, or (balance_scope global) each group of micro-batches the data-parallel ranks run together.
            units = d.global_batch_size // d.micro_batch_size
            scope_global = cfg.model.moe.balance_scope == "global" and dims.dp_size > 1
            if scope_global:
                units //= dims.dp_size
            self.moe = MoEContext(loss_scale=self.grad_scale / units)
            if scope_global:
                self.moe.total = data_parallel_total(dp_group(dims))

    # ---- building -------------------------------------------------------------------------------------------
    def build_model(self, start_step: int) -> nn.Module:
        """The whole model on this rank's device, initialised by name and seed, as trained through ``start_step``
        (self-guided layers past their guided phase have no guide). An incubation (``assembly.phase: incubate``) builds the
        meta model with module k in it, and checkpoints only what module k trains."""
        cfg = self.cfg
        if cfg.assembly.phase == "incubate":
            from pretrain.assembly.hybrid import (
                build_hybrid,
                checkpoint_name,
                hybrid_config,
                incubation_flops_per_token,
            )
            from pretrain.assembly.phases import meta_checkpoint

            self.checkpoint_names = lambda name: checkpoint_name(cfg, cfg.assembly.module, name)
            self.flops_per_token = incubation_flops_per_token(cfg)
            self.layout_cfg = hybrid_config(cfg)
            return build_hybrid(cfg, meta_checkpoint(cfg), self.device)
        model = build_model(cfg.model, cfg.train.seed, self.device)
        sg = cfg.model.ffn.self_guided
        if sg.enabled:
            set_guided_phase(model, start_step, cfg.guided_steps, sg.reduce_flop)
        return model

    def prepare(self, compile_the_loss: bool = True) -> None:
        """After the layout is applied: the MoE kernels, compilation and the optimizer."""
        tr, p = self.cfg.train, self.cfg.parallel
        if self.moe is not None:
            bf16 = tr.precision == "bf16" or (p.param_dtype == "bf16" and self.dims.dp_size > 1)
            use_grouped_gemm(self.model, self.device, torch.bfloat16 if bf16 else torch.float32, tr.compile)
        apply_compile(self.model, tr.compile)
        if compile_the_loss:
            self.loss_sum = compile_loss(lm_loss_sum, tr.compile)
        self.optimizer = build_optimizer(self.model, self.cfg.optim)

    # ---- one step -------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch], hooks: StepHooks | None = None,
                   measure: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward every micro-batch, clip, step. Returns (mean token loss, gradient norm) as device
        tensors: reading them is left to the log interval, so the step has no host-device sync. ``measure``:
        time this step in detail, for ``metrics`` (the loop asks on the steps it logs)."""
        loss = self.forward_backward(micro_batches, measure)
        if hooks is not None:
            hooks.after_backward()
        faults.reached("step.after_backward", getattr(hooks, "step", 0))
        norm = self.clip_gradients()
        if hooks is not None:
            hooks.before_optimizer_step()
        self.stepped = self.optimizer_step(norm)
        return loss, norm

    def forward_backward(self, micro_batches: list[MicroBatch], measure: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def clip_gradients(self) -> torch.Tensor:
        """The global gradient norm, and the gradients scaled to ``optim.grad_clip`` when it is larger."""
        norm = grad_norm(self.norm_params(), self.device, self.norm_group())
        clip_grads_(self.model.parameters(), self.cfg.optim.grad_clip or math.inf, norm)
        return norm

    def norm_params(self) -> Iterable[nn.Parameter]:
        """The parameters whose gradients count in the norm (each distinct gradient once)."""
        return self.model.parameters()

    def norm_group(self) -> dist.ProcessGroup | None:
        """Ranks that hold other parameters, whose squared norms add to this rank's (pipeline stages)."""
        return None

    def optimizer_step(self, grad_norm: torch.Tensor) -> bool:
        """The optimizer step, unless ``train.skip_nonfinite`` and the gradient norm is NaN or infinite: then the
        gradients are dropped and weights and optimizer state stay as they were. The norm is the same on every
        rank (reduced over all of them), so every rank decides alike. Returns whether the step was taken."""
        finite = not self.cfg.train.skip_nonfinite or bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def weights_finite(self) -> bool:
        """Whether every weight on every rank is finite (a collective; checked before each checkpoint)."""
        flags = [torch.isfinite(self.local_tensor(p)).all() for p in self.model.parameters()]
        ok = (torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)).to(self.device, torch.float32)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    def local_tensor(self, p: nn.Parameter) -> torch.Tensor:
        """The part of ``p`` this rank holds."""
        return p.to_local() if isinstance(p, DTensor) else p

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def remove_params(self, params: list[torch.Tensor]) -> None:
        """Take parameters out of training (self-guided guides after their phase), freeing their state."""
        remove_params(self.optimizer, params)

    def global_tokens(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        """Loss-bearing tokens of the whole global batch (all data-parallel ranks), counted on the host from
        the host-side masks and left on the device: reading the reduced count back would be a host sync."""
        n = torch.tensor(sum(float(mb.loss_mask.sum()) for mb in micro_batches), dtype=torch.float64)
        return all_reduce_sum(n.to(self.device), self.dims).float()

    def loss_context(self) -> contextlib.AbstractContextManager:
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def metrics(self) -> dict:
        """What the engine measured on the last ``measure``d step (every rank calls it at the log interval)."""
        return {}

    # ---- evaluation and sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[list[MicroBatch]]) -> float:
        """Mean token loss over ``batches`` (each a global batch's micro-batches of this rank), over all ranks."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, tokens
        for micro_batches in batches:
            for mb in micro_batches:
                totals[1] += float(mb.loss_mask.sum())
                loss = self.eval_loss_sum(mb.to(self.device))
                if loss is not None:
                    totals[0] += loss.double()
        self.model.train()
        self.sum_eval_losses(totals[:1])
        all_reduce_sum(totals, self.dims)
        return float(totals[0]) / max(float(totals[1]), 1.0)

    def eval_loss_sum(self, mb: MicroBatch) -> torch.Tensor | None:
        """The summed token loss of one micro-batch (forward only), or None on a rank that computes no loss."""
        raise NotImplementedError

    def sum_eval_losses(self, loss: torch.Tensor) -> None:
        """Bring the evaluation loss sum to every rank that computed none of it (pipeline stages)."""

    def next_token_logits(self, context: torch.Tensor) -> torch.Tensor:
        """The next token's logits (vocab,) after ``context`` (1, seq), the same on every rank."""
        raise NotImplementedError

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        """Write the model and optimizer state into ``directory`` (every rank takes part)."""
        checkpoint.save_dcp(directory, self.model, self.optimizer, names=self.checkpoint_names)

    def load_state(self, directory: Path) -> None:
        checkpoint.load_dcp(directory, self.model, self.optimizer, names=self.checkpoint_names)
