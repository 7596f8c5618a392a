"""A run that grows while it trains (``growth:`` in the config): which stage a step belongs to, the config of each
stage, and the growth itself between two steps (checkpoint the small model, grow its weights, save them as the
grown stage's first checkpoint, rebuild under the stage's layout). The loop runs it through ``GrowthStages``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pretrain.config import GrowthStage, ModelConfig, MoEConfig, RunConfig
from pretrain.config.loading import build
from pretrain.config.parallel import ParallelConfig
from pretrain.errors import UserError
from pretrain.growth.offline import GrowthSpec, apply, load_planned
from pretrain.growth.operators import DEPTH_OPS
from pretrain.models.transformer import num_params
from pretrain.train.callbacks import Callback

if TYPE_CHECKING:
    from pretrain.train.trainer import Trainer


def spec_of(stage: GrowthStage) -> GrowthSpec:
    moe = MoEConfig(num_experts=stage.experts, top_k=stage.top_k, router=stage.router) if stage.op == "upcycle" else None
    return GrowthSpec(stage.op, factor=stage.factor or None, num_layers=stage.num_layers or None,
                      hidden_factor=stage.hidden_factor, ffn_size=stage.ffn_size or None, moe=moe)


def grown_model_config(stage: GrowthStage, cfg: ModelConfig) -> ModelConfig:
    """The model config after ``stage``, from the configs alone (what the operator will produce)."""
    if stage.op in DEPTH_OPS:
        return dataclasses.replace(cfg, num_layers=stage.num_layers or cfg.num_layers * (stage.factor or 4))
    if stage.op == "width":
        g = stage.hidden_factor
        return dataclasses.replace(cfg, hidden_size=cfg.hidden_size * g, num_heads=cfg.num_heads * g,
                                   num_kv_heads=cfg.num_kv_heads * g, ffn_hidden_size=stage.ffn_size or cfg.ffn_size)
    return dataclasses.replace(cfg, moe=spec_of(stage).moe)


def check_stages(cfg: RunConfig) -> None:
    """Each stage's operator accepts the model of the stage before it, and each grown model and layout is a valid
    run: found before the run starts, not hours later when it reaches the stage."""
    from pretrain.config.fields import ConfigError, require
    from pretrain.growth.operators import GrowthError, depth_map, upcycle_target, width_target

    model = cfg.model
    for i, stage in enumerate(cfg.growth):
        key = f"growth[{i}]"
        try:
            if stage.op in DEPTH_OPS:
                target = stage.num_layers or model.num_layers * (stage.factor or 4)
                require(target > model.num_layers, f"{key}.num_layers" if stage.num_layers else f"{key}.factor",
                        f"the grown model would have {target} blocks, the stage before it has {model.num_layers}: "
                        "growth adds blocks.")
                depth_map(stage.op, model.num_layers, target)
            elif stage.op == "width":
                width_target(model, stage.hidden_factor, stage.ffn_size or None)
            else:
                upcycle_target(model, spec_of(stage).moe)
        except GrowthError as e:
            raise ConfigError(f"{key}.op", f"{stage.op} cannot grow the model before this stage: {e}") from None
        try:
            model = stage_config(cfg, i + 1).model
        except UserError as e:
            raise ConfigError(key, f"the run after this stage would be refused: {e}") from None


def stage_config(cfg: RunConfig, stage: int) -> RunConfig:
    """The config of ``stage`` (0: before any growth): the model grown by the stages up to it, the layout of the
    newest stage that sets one, and no stages of its own (it describes that model alone, as its checkpoints do)."""
    model, parallel = cfg.model, cfg.parallel
    for entry in cfg.growth[:stage]:
        model = grown_model_config(entry, model)
        if entry.parallel:
            parallel = build(ParallelConfig, {**dataclasses.asdict(parallel), **entry.parallel}, "parallel")
    if parallel.world_size != cfg.parallel.world_size:
        raise UserError(f"growth[{stage - 1}].parallel makes a layout of {parallel.world_size} processes, but the run "
                        f"has {cfg.parallel.world_size}; a stage keeps the run's processes.")
    return dataclasses.replace(cfg, model=model, parallel=parallel, growth=[]).validate()


def stage_at(cfg: RunConfig, step: int) -> int:
    """The stage that trains step ``step + 1`` (the stage a run at ``step`` is in)."""
    return sum(1 for entry in cfg.growth if entry.at_step <= step)


def stage_bounds(cfg: RunConfig, stage: int) -> tuple[int, int]:
    """(first step - 1, last step) of ``stage``: its LR schedule warms up and decays within them."""
    starts = [0] + [entry.at_step for entry in cfg.growth]
    ends = [entry.at_step for entry in cfg.growth] + [cfg.total_steps]
    return starts[stage], ends[stage]


class GrowthStages(Callback):
    """After the last step of a stage (whose checkpoint the Checkpointer has just written): grow."""

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        if trainer.stage < len(trainer.run_cfg.growth) and step == trainer.run_cfg.growth[trainer.stage].at_step:
            trainer.grow()


def in_place(run_cfg: RunConfig, stage: int) -> bool:
    """Whether growth into ``stage`` runs on every rank, each reading the shards it holds (the depth operators: each
    grown tensor is a source tensor, scaled, or new), or on one process (width and upcycling slice and copy)."""
    return run_cfg.growth[stage - 1].op in DEPTH_OPS


def move_to_record(saved: Path, record_dir: Path) -> None:
    """Keep the small model's last checkpoint as the stage's record (rank 0)."""
    record_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(record_dir, ignore_errors=True)
    shutil.move(str(saved), str(record_dir))


def grown_state(run_cfg: RunConfig, stage: int, record_dir: Path) -> dict:
    """The trainer state the grown stage starts with: the small model's, with the growth recorded."""
    from pretrain.train import checkpoint

    small, grown = stage_config(run_cfg, stage - 1), stage_config(run_cfg, stage)
    state = checkpoint.read_state(record_dir)
    state.pop("callbacks", None)
    record = {"op": run_cfg.growth[stage - 1].op, "from": str(record_dir), "at_step": state["step"],
              "tokens": state["tokens"], "params_before": num_params(small.model),
              "params_after": num_params(grown.model), "flops_before": state["flops"]}
    return {**state, "stage": stage, "growth": [*state.get("growth", []), record]}


def load_grown(run_cfg: RunConfig, stage: int, model: torch.nn.Module, record_dir: Path) -> None:
    """Fill ``model`` (the grown stage's, built under its layout) from the small model's checkpoint ``record_dir``,
    every rank reading only what it holds (``offline.load_planned``)."""
    from pretrain.growth.operators import GrowthError, depth_plan

    spec = spec_of(run_cfg.growth[stage - 1])
    small, grown = stage_config(run_cfg, stage - 1).model, stage_config(run_cfg, stage).model
    try:
        tcfg, plan = depth_plan(small, spec.op, spec.num_layers, spec.factor)
    except GrowthError as e:
        raise UserError(f"cannot grow with {spec.op}: {e}") from None
    if tcfg != grown:
        raise UserError(f"growth[{stage - 1}] produced model {tcfg}, not the configured {grown}.")
    load_planned(plan, model, record_dir)


def grow_saved(run_cfg: RunConfig, stage: int, record_dir: Path, ckpt_root: Path, config_yaml: str,
               keep: int) -> Path:
    """On one process (rank 0), for the operators that do not grow in place: the small model in ``record_dir`` grown
    in memory, saved with a fresh AdamW state as the checkpoint of the same step."""
    from pretrain.api import load_model
    from pretrain.models.transformer import build_model
    from pretrain.train import checkpoint
    from pretrain.train.optim import build_optimizer

    small = stage_config(run_cfg, stage - 1)
    grown_cfg = stage_config(run_cfg, stage)
    grown = apply(spec_of(run_cfg.growth[stage - 1]), load_model(record_dir).state_dict(), small.model,
                  run_cfg.train.seed)
    if grown.cfg != grown_cfg.model:
        raise UserError(f"growth[{stage - 1}] produced model {grown.cfg}, not the configured {grown_cfg.model}.")
    model = build_model(grown.cfg, run_cfg.train.seed)
    model.load_state_dict(grown.state, strict=True)
    optimizer = build_optimizer(model, grown_cfg.optim)
    state = grown_state(run_cfg, stage, record_dir)
    return checkpoint.save(ckpt_root, state["step"], lambda d: checkpoint.save_dcp(d, model, optimizer, no_dist=True),
                           state, config_yaml, keep, single_process=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
