"""Engines: one implementation of "run one global batch, clip, step, evaluate, save" per way of executing a
step (``base.Engine`` is the interface the loop talks to)."""

from __future__ import annotations

import torch

from pretrain.config import RunConfig
from pretrain.parallel.mesh import ParallelDims
from pretrain.train.engines.base import Engine, StepHooks


def build_engine(cfg: RunConfig, dims: ParallelDims, device: torch.device, start_step: int = 0) -> Engine:
    """The engine the layout needs, its model prepared as trained through ``start_step``."""
    if cfg.parallel.engine == "deepspeed":
        from pretrain.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, dims, device, start_step)
    if cfg.parallel.pp > 1:
        from pretrain.train.engines.pipeline import PipelineEngine

        return PipelineEngine(cfg, dims, device, start_step)
    from pretrain.train.engines.plain import PlainEngine

    return PlainEngine(cfg, dims, device, start_step)


__all__ = ["Engine", "StepHooks", "build_engine"]
