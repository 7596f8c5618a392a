"""The ``growth:`` list: stages of a run that grows its model while it trains (docs/methods.md, model growth).

Each entry grows the model after optimizer step ``at_step`` with one operator (``pretrain grow`` takes the same
ones); the run checkpoints the small model, grows it, rebuilds it under the stage's layout and goes on in the same
run directory with a fresh AdamW state and a fresh LR schedule (warmup, then decay to the next stage or the end),
reading the data where the small model stopped."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

from pretrain.config.fields import option, require

if TYPE_CHECKING:
    from pretrain.config.run import RunConfig


@dataclass(frozen=True)
class GrowthStage:
    at_step: int = option(0, "Grow after this optimizer step (its checkpoint is the smaller model's last).")
    op: Literal["stack", "interpolate", "zero", "random", "width", "upcycle"] = option(
        "stack", "Operator: stack (G_stack), interpolate, zero, random (depth), width, upcycle (dense -> MoE).")
    factor: int = option(0, "Depth operators: the grown model has factor x the blocks (0: 4, or num_layers).")
    num_layers: int = option(0, "Depth operators: the grown model's blocks (instead of factor).")
    hidden_factor: int = option(1, "width: hidden size and attention heads times this.")
    ffn_size: int = option(0, "width: the FFN's new inner width (0: unchanged).")
    experts: int = option(0, "upcycle: experts per MoE layer.")
    top_k: int = option(2, "upcycle: experts per token.")
    router: Literal["topk_softmax", "noisy_topk", "hash"] = option("topk_softmax", "upcycle: the router.")
    parallel: dict = option({}, "Layout of the grown stage, as parallel.* keys (e.g. {pp: 2, dp_shard: 1}); the "
                                "number of processes stays the run's.")


# The kind of operator each stage key is for (`pretrain grow` has the same options as flags, and --layers for depth).
OPERATOR_OF = {"factor": "depth", "num_layers": "depth", "hidden_factor": "width", "ffn_size": "width",
               "experts": "upcycle", "top_k": "upcycle", "router": "upcycle"}


def operator_kind(op: str) -> str:
    """depth (stack, interpolate, zero, random), width or upcycle."""
    return op if op in ("width", "upcycle") else "depth"


def check_growth(cfg: RunConfig) -> None:
    """Stage steps in order and inside the run, operator arguments that make sense, layout keys that exist."""
    from pretrain.config.parallel import ParallelConfig

    require(not (cfg.growth and cfg.model.ffn.self_guided.enabled), "growth",
            "a self-guided model carries a dense guide per structured layer during its guided phase; grow it offline "
            "(pretrain grow) after that phase.")
    previous = 0
    allowed = {f.name for f in fields(ParallelConfig)}
    defaults = GrowthStage()
    for i, stage in enumerate(cfg.growth):
        key = f"growth[{i}]"
        require(previous < stage.at_step < cfg.train.max_steps, f"{key}.at_step",
                f"{stage.at_step} must lie after the previous stage ({previous}) and before train.max_steps "
                f"({cfg.train.max_steps}).")
        previous = stage.at_step
        require(stage.op != "upcycle" or stage.experts >= 1, f"{key}.experts", "upcycle needs experts >= 1.")
        require(stage.hidden_factor >= 1 and stage.factor >= 0 and stage.num_layers >= 0 and stage.ffn_size >= 0,
                key, "factors and sizes must not be negative (hidden_factor at least 1).")
        require(stage.op != "upcycle" or 1 <= stage.top_k <= stage.experts, f"{key}.top_k",
                f"must lie in [1, experts={stage.experts}], got {stage.top_k}.")
        foreign = [name for name, owner in OPERATOR_OF.items()
                   if owner != operator_kind(stage.op) and getattr(stage, name) != getattr(defaults, name)]
        require(not foreign, f"{key}.{foreign[0] if foreign else ''}",
                f"{', '.join(foreign)} belong to another operator than op={stage.op}, which would ignore them: drop "
                "them, or choose the operator they are for.")
        unknown = sorted(set(stage.parallel) - allowed)
        require(not unknown, f"{key}.parallel", f"unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}.")

