"""The DeepSpeed engine (``parallel.engine: deepspeed``): data parallelism by DeepSpeed's ZeRO stages 1-3, with
optimizer (and, at stage 3, parameter) offload to the CPU. The model, its initialisation, the loss, the MoE router
losses, autocast and activation checkpointing are ours; DeepSpeed partitions the optimizer state, gradients and
parameters, reduces the gradients, clips them and steps our torch AdamW over its flattened partitions.

Checkpoints are ordinary checkpoints of this stack: model and optimizer state under global parameter names
(DCP), the full tensors assembled from the ZeRO partitions one parameter at a time, each written by one rank.
So a DeepSpeed run resumes under another number of ranks, starts an FSDP2 run and starts from one (optimizer
state included), and ``pretrain export`` / ``pretrain.load_model`` read it like any other.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pretrain import device as devices
from pretrain.config import RunConfig
from pretrain.config.deepspeed import deepspeed_config
from pretrain.data.loader import MicroBatch
from pretrain.generate import last_logits
from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
from pretrain.parallel.mesh import ParallelDims
from pretrain.train import checkpoint, faults
from pretrain.train.engines.base import Engine, StepHooks
from pretrain.train.optim import build_optimizer

ADAM_STATE = ("exp_avg", "exp_avg_sq")


class DeepSpeedEngine(Engine):
    """Our model under ``deepspeed.initialize`` with our AdamW (see the module docstring); ``ds`` is DeepSpeed's
    engine, ``model`` its module (parameters under their global names), ``optimizer`` its ZeRO optimizer."""

    def __init__(self, cfg: RunConfig, dims: ParallelDims, device: torch.device, start_step: int = 0):
        super().__init__(cfg, dims, device)
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its config dump and per-step notes
        # DeepSpeed compiles a shared-memory all-reduce for its inference kernels on a CPU's first start (about
        # 40 s); training never calls it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():  # one process: DeepSpeed still talks through a process group
            os.environ.setdefault("LOCAL_RANK", "0")
            started = "MASTER_ADDR" in os.environ  # by torchrun (its own store), else a store of our own
            dist.init_process_group(devices.backend(device), rank=0, world_size=1,
                                    init_method=None if started else f"tcp://127.0.0.1:{_free_port()}")
        model = self.build_model(start_step)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
        _autocast_inside(model, device, cfg.train.precision)
        optimizer = build_optimizer(model, cfg.optim)
        names = {id(p): name for name, p in model.named_parameters()}  # (a tied weight: its first name, as torch)
        self.group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, dims.dp_size), dist_init_required=False)
        self.model = self.ds.module
        self.stage = cfg.parallel.zero_stage

    # ---- one step -------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch], hooks: StepHooks | None = None,
                   measure: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """As the base engine's, but DeepSpeed clips inside its step (``gradient_clipping``) and skips a step whose
        gradient norm is not finite; the norm it measured before clipping is returned."""
        loss = self.forward_backward(micro_batches, measure)
        if hooks is not None:
            hooks.after_backward()
        faults.reached("step.after_backward", getattr(hooks, "step", 0))
        if hooks is not None:
            hooks.before_optimizer_step()
        self.ds.step()  # the last micro-batch's: the gradient-accumulation boundary
        norm = self.ds.get_global_grad_norm()
        self.stepped = not getattr(self.ds.optimizer, "overflow", False)
        norm = torch.as_tensor(float("nan") if norm is None else float(norm), dtype=torch.float32)
        return loss, norm.to(self.device)

    def forward_backward(self, micro_batches: list[MicroBatch], measure: bool = False) -> torch.Tensor:
        """Each micro-batch's loss is its share of the global token mean, times the data-parallel size that
        DeepSpeed's gradient average divides by (as for FSDP); DeepSpeed's own 1/accumulation scaling is off."""
        n_tokens = self.global_tokens(micro_batches)
        loss_total = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            mb = mb.to(self.device)
            with devices.autocast(self.device, self.cfg.train.precision):
                logits = self.ds(mb.tokens, moe=self.moe)
            loss = self.loss_sum(logits, mb) / n_tokens
            self.ds.backward(loss * self.grad_scale, scale_wrt_gas=False)
            if i < len(micro_batches) - 1:
                self.ds.step()  # not a boundary: DeepSpeed only counts the micro-batch
            loss_total += loss.detach()
        return loss_total

    def clip_gradients(self) -> torch.Tensor:
        raise NotImplementedError("DeepSpeed clips inside its step (see train_step)")

    def optimizer_step(self, grad_norm: torch.Tensor) -> bool:
        raise NotImplementedError("DeepSpeed steps in train_step")

    def local_tensor(self, p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if hasattr(p, "ds_tensor") else p  # (ZeRO-3: this rank's partition)

    def remove_params(self, params: list[torch.Tensor]) -> None:
        raise NotImplementedError("refused at config load (self-guided training with DeepSpeed)")

    # ---- evaluation and sampling ----------------------------------------------------------------------------
    def eval_loss_sum(self, mb: MicroBatch) -> torch.Tensor:
        with devices.autocast(self.device, self.cfg.train.precision):
            return self.loss_sum(self.model(mb.tokens), mb)

    @torch.no_grad()
    def next_token_logits(self, context: torch.Tensor) -> torch.Tensor:
        with devices.autocast(self.device, self.cfg.train.precision):
            return last_logits(self.model(context))

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        """Every tensor whole under its global name; parameter i (and its AdamW state) is kept and written by rank
        i mod world size, so no rank holds more than its share of the full tensors at once."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        rank, world = _rank_world()
        self._link_optimizer_state()
        params = dict(self.model.named_parameters())
        model_sd: dict[str, torch.Tensor] = {}
        state: dict[str, dict] = {}
        steps = self._optimizer_steps()
        for i, (name, p) in enumerate(params.items()):
            full = safe_get_full_fp32_param(p) if self.stage == 3 else p.detach()
            moments = {key: safe_get_full_optimizer_state(p, key) for key in ADAM_STATE} if steps else {}
            if i % world == rank:
                model_sd[name] = full.detach().cpu().clone()
                if steps:
                    state[name] = {"step": steps[self._group_of(name)].clone(),
                                   **{key: value.detach().cpu().clone() for key, value in moments.items()}}
        for name, value in self.model.state_dict().items():  # a tied weight's other name; buffers (rank 0)
            if name in params:
                continue
            source = _alias(self.model, name, params)
            if source is not None and source in model_sd:
                model_sd[name] = model_sd[source]
            elif source is None and rank == 0:
                model_sd[name] = value.detach().cpu().clone()
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": list(names)}
                  for group, names in zip(self.optimizer.param_groups, self.group_names, strict=True)]
        checkpoint.save_states(directory, {"model": model_sd, "optim": {"state": state, "param_groups": groups}})

    def load_state(self, directory: Path) -> None:
        """Model and, when the checkpoint has it, AdamW state: from a checkpoint of this engine under any number of
        ranks, or of the native engine (FSDP2, DDP, one process), read whole and set into this rank's partitions."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = dict(self.model.named_parameters())
        keys = checkpoint.saved_keys(directory)
        model_sd = {name: torch.empty(_full_shape(p), dtype=torch.float32) for name, p in params.items()}
        with_optim = all(f"optim.state.{name}.exp_avg" in keys for name in params)
        state = {name: {"step": torch.zeros(()), **{key: torch.empty(_full_shape(p)) for key in ADAM_STATE}}
                 for name, p in params.items()} if with_optim else {}
        loaded = checkpoint.load_states(directory, {"model": model_sd, "optim": {"state": state}} if with_optim
                                        else {"model": model_sd})
        if not with_optim and _rank_world()[0] == 0:
            print(f"{directory} holds no optimizer state for every parameter: the weights are loaded, the AdamW "
                  "moments start fresh")
        import deepspeed

        for name, p in params.items():
            full = loaded["model"][name].to(self.device)
            if self.stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if _rank_world()[0] == 0:
                        p.data.copy_(full)
            else:
                p.data.copy_(full)
            safe_set_full_fp32_param(p, full)
        if with_optim:
            self._create_optimizer_state()
            self._link_optimizer_state()
            for name, p in params.items():
                for key in ADAM_STATE:
                    safe_set_full_optimizer_state(p, loaded["optim"]["state"][name][key].to(self.device), key)
            for flat, group in self._flat_partitions():
                step = loaded["optim"]["state"][self.group_names[group][0]]["step"]
                self.optimizer.optimizer.state[flat]["step"].fill_(float(step))

    # ---- DeepSpeed's flattened partitions -------------------------------------------------------------------
    def _flat_partitions(self) -> list[tuple[torch.Tensor, int]]:
        """(fp32 flat partition of this rank, index of its optimizer group) for each partition DeepSpeed steps."""
        zero = self.optimizer
        if self.stage == 3:
            return [(flat, zero.sub_group_to_group_id[i]) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
        return [(flat, i) for i, flat in enumerate(zero.single_partition_of_fp32_groups)]

    def _optimizer_steps(self) -> list[torch.Tensor] | None:
        """AdamW's step count of each optimizer group, or None before the first step (no state yet)."""
        inner, steps = self.optimizer.optimizer, {}
        for flat, group in self._flat_partitions():
            if "step" not in inner.state.get(flat, {}):
                return None
            steps[group] = torch.as_tensor(inner.state[flat]["step"]).detach().cpu().float()
        return [steps[g] for g in range(len(self.group_names))]

    def _group_of(self, name: str) -> int:
        return next(g for g, names in enumerate(self.group_names) if name in names)

    def _create_optimizer_state(self) -> None:
        """AdamW's state on each flat partition (torch creates it lazily at the first step), to be filled in."""
        inner = self.optimizer.optimizer
        for flat, group in self._flat_partitions():
            if not inner.state.get(flat):
                on_device = inner.param_groups[group].get("fused") or inner.param_groups[group].get("capturable")
                inner.state[flat] = {"step": torch.zeros((), dtype=torch.float32,
                                                         device=flat.device if on_device else "cpu"),
                                     **{key: torch.zeros_like(flat) for key in ADAM_STATE}}

    def _link_optimizer_state(self) -> None:
        """Point each parameter's fragment map at its AdamW state. DeepSpeed links them once, after stepping its
        first optimizer group, so the state of the other groups is missed (ZeRO-1/2); linking again fixes that."""
        if self.stage < 3 and self._optimizer_steps() is not None:
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()


def _autocast_inside(model: nn.Module, device: torch.device, precision: str) -> None:
    """Run ``model``'s forward under our autocast from within: DeepSpeed's engine turns an autocast entered around
    it off (unless its own ``torch_autocast``, which also lowers the gradient reduction to bf16, is configured), so
    bf16 training would silently run its matmuls in fp32."""
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with devices.autocast(device, precision):
            return forward(*args, **kwargs)

    model.forward = autocast_forward


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _full_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _alias(model: nn.Module, name: str, params: dict[str, nn.Parameter]) -> str | None:
    """The parameter name a state-dict entry shares its tensor with (a tied weight), or None for a buffer."""
    module_name, _, leaf = name.rpartition(".")
    tensor = model.get_submodule(module_name)._parameters.get(leaf) if module_name else model._parameters.get(leaf)
    if tensor is None:
        return None
    return next(other for other, p in params.items() if p is tensor)
