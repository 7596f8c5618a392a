"""The loop's extension points, and the callbacks the methods add: what a method or a tool adds to training
lives in a callback, not in an `if flag:` branch of the loop.

Hooks, in the order a run calls them (``trainer`` is the loop, ``step`` the 1-based optimizer step):

  on_run_start(trainer)                         before the first step (after any resume)
  on_step_start(trainer, step)                  the LR of the step is set, the batch not yet read
  on_after_backward(trainer, step)              gradients exist, not yet clipped
  on_before_optimizer_step(trainer, step)       gradients clipped; the optimizer steps next
  on_step_end(trainer, step, loss, grad_norm)   the step is done (device tensors: read them sparingly)
  on_evaluate(trainer, step, val_loss)          after a validation loss
  on_save_checkpoint(trainer, step, path)       a checkpoint was written
  on_load_checkpoint(trainer, step, path)       the run resumed from a checkpoint (before on_run_start)
  on_run_end(trainer)                           after the last step (also after a stop by signal)
  on_error(trainer, error)                      the run failed; the error is raised again afterwards
  metrics(trainer, step) -> dict                numbers for the log interval's record

A callback with state returns it from ``state_dict`` (JSON values) under its ``state_key``; checkpoints store it
and a resumed run hands it back to ``load_state_dict`` before ``on_load_checkpoint``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from pretrain.config import RunConfig
from pretrain.models.moe import moe_layers
from pretrain.models.structured import alpha_at, guided_layers
from pretrain.parallel.plan import all_reduce_sum

if TYPE_CHECKING:
    from pathlib import Path

    from pretrain.train.trainer import Trainer


class Callback:
    state_key: str | None = None  # set it (unique per run) to have state_dict saved in checkpoints

    def on_run_start(self, trainer: Trainer) -> None:
        pass

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        pass

    def on_after_backward(self, trainer: Trainer, step: int) -> None:
        pass

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        pass

    def on_evaluate(self, trainer: Trainer, step: int, val_loss: float) -> None:
        pass

    def on_save_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        pass

    def on_load_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        pass

    def on_run_end(self, trainer: Trainer) -> None:
        pass

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        pass

    def metrics(self, trainer: Trainer, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SelfGuidedSchedule(Callback):
    """Self-guided training (docs/methods.md): alpha decays 1 -> 0 by cosine over the guided steps, set once per
    optimizer step; when it reaches 0 the dense guides leave the modules and the optimizer. In same-FLOPs mode the
    data starts over after the guided steps (``RunConfig.replay_after``)."""

    def __init__(self, steps: int, replay_after: int = 0):
        self.steps, self.replay_after = steps, replay_after

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        layers = guided_layers(trainer.model)
        if step <= self.steps:
            for layer in layers:
                layer.alpha = alpha_at(step - 1, self.steps)
        elif any(layer.has_guide for layer in layers):
            guides = [layer.guide for layer in layers if layer.has_guide]
            for layer in layers:
                layer.remove_guide()
            trainer.engine.remove_params(guides)

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if step == self.replay_after:
            trainer.state["consumed_samples"] = 0  # the rest of the run reads the data from the start again

    def metrics(self, trainer: Trainer, step: int) -> dict:
        layers = guided_layers(trainer.model)
        return {"sgt_alpha": layers[0].alpha} if layers else {}


class MoEMetrics(Callback):
    """Per-layer expert load of the last micro-batch of every data-parallel rank together (the global
    micro-batch), read once per log interval (docs/methods.md)."""

    def metrics(self, trainer: Trainer, step: int) -> dict:
        record = {}
        dp = trainer.dims.dp_size
        stats = trainer.engine.moe.stats
        for layer in moe_layers(trainer.model):
            if layer.layer_idx not in stats:
                continue
            s = stats[layer.layer_idx]
            name = f"blocks_{layer.layer_idx}_ffn"
            packed = torch.cat([s["tokens_per_expert"].float().flatten(),
                                torch.stack([s[k].float() for k in ("dropped_fraction", "balance_loss", "z_loss")])])
            packed = all_reduce_sum(packed, trainer.dims).cpu()
            tokens, (dropped, balance, z) = packed[:-3], (packed[-3:] / dp).tolist()
            record.update({f"moe/{name}/tokens_min": float(tokens.min()), f"moe/{name}/tokens_max": float(tokens.max()),
                           f"moe/{name}/load_cv": float(tokens.std(correction=0) / tokens.mean().clamp_min(1e-10)),
                           f"moe/{name}/dropped_fraction": dropped, f"moe/{name}/balance_loss": balance,
                           f"moe/{name}/z_loss": z, f"moe_tokens_per_expert/{name}": tokens.tolist()})
        return record


class DepthDiagnostics(Callback):
    """What motivates Mix-LN and LNS: per-block gradient norms and the angular distance between each
    block's input and output (arccos of their cosine similarity over pi, averaged over tokens), so deep
    blocks that barely change the residual stream show up. Measured every ``interval`` steps."""

    def __init__(self, interval: int):
        self.interval = interval
        self.handles: list = []
        self.angles: dict[str, list[torch.Tensor]] = {}

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if step % self.interval:
            return
        self.angles = {key: [] for key in trainer.model.blocks}
        for key, block in trainer.model.blocks.items():
            self.handles.append(block.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(module, args, output):
            with torch.no_grad():
                cos = torch.nn.functional.cosine_similarity(args[0].float(), output.float(), dim=-1)
                self.angles[key].append(torch.arccos(cos.clamp(-1.0, 1.0)).mean() / math.pi)
        return hook

    def on_after_backward(self, trainer: Trainer, step: int) -> None:
        if not self.handles:
            return
        for handle in self.handles:
            handle.remove()
        self.handles = []
        record: dict = {"step": step}
        for key, block in trainer.model.blocks.items():
            # (squares in fp64: a vanishing block's gradient, 1e-20 and below, would square to 0 in fp32)
            grads = [p.grad.double().pow(2).sum() for p in block.parameters() if p.grad is not None]
            record[f"depth/grad_norm/{key}"] = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
            record[f"depth/angular_distance/{key}"] = float(torch.stack(self.angles[key]).mean())
        trainer.metrics.log(record)


def method_callbacks(cfg: RunConfig) -> list[Callback]:
    """The callbacks the configured methods need."""
    callbacks: list[Callback] = []
    if cfg.model.ffn.self_guided.enabled:
        callbacks.append(SelfGuidedSchedule(cfg.guided_steps, cfg.replay_after))
    if cfg.model.moe.num_experts:
        callbacks.append(MoEMetrics())
    if cfg.logging.depth_interval:
        callbacks.append(DepthDiagnostics(cfg.logging.depth_interval))
    return callbacks
