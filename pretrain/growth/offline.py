"""``pretrain grow SRC DST``: a checkpoint grown into a new run directory that ``pretrain train`` continues from.

The source may come from any layout (checkpoints are keyed by global names). In one process it is read resharded
into the CPU's memory, source and grown weights at once; under torchrun the grown model is built under the target
config's layout and no rank holds the whole model: for depth every rank reads only the shards it holds, for width
and upcycling every rank grows one tensor at a time and keeps its shard. The grown run starts
with a fresh AdamW state and LR schedule (step 0) unless ``carry_optimizer``, and reads the data from where the
small model stopped; its trainer state carries the tokens and FLOPs spent so far and a record of every growth."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pretrain.config import ModelConfig, MoEConfig, RunConfig, load_config
from pretrain.errors import UserError
from pretrain.growth.operators import (
    DEPTH_OPS,
    Grown,
    GrowthError,
    Plan,
    depth_plan,
    grow_depth,
    grow_width,
    upcycle,
    upcycle_source,
    upcycle_target,
    upcycled,
    widen,
    width_spaces,
    width_target,
)
from pretrain.models.structured import set_guided_phase
from pretrain.models.transformer import Transformer, build_model, flops_per_token, num_params
from pretrain.paths import require_writable_dir
from pretrain.train import checkpoint
from pretrain.train.optim import build_optimizer

OPS = (*DEPTH_OPS, "width", "upcycle")


@dataclasses.dataclass(frozen=True)
class GrowthSpec:
    """What to grow: ``op`` and its arguments (the CLI's options, or an entry of a run's ``growth:`` list)."""

    op: str
    factor: int | None = None
    num_layers: int | None = None
    layers: list[int | None] | None = None
    hidden_factor: int = 1
    ffn_size: int | None = None
    moe: MoEConfig | None = None


def apply(spec: GrowthSpec, state: dict[str, torch.Tensor], cfg: ModelConfig, seed: int) -> Grown:
    """Run the operator ``spec`` names; a refusal becomes a user error with its reason."""
    try:
        if spec.op in DEPTH_OPS:
            return grow_depth(state, cfg, spec.op, spec.num_layers, spec.factor, spec.layers, seed)
        if spec.op == "width":
            return grow_width(state, cfg, spec.hidden_factor, spec.ffn_size, seed)
        if spec.op == "upcycle":
            if spec.moe is None:
                raise GrowthError("upcycling needs the experts: give --experts (and --top-k, --router).")
            return upcycle(state, cfg, spec.moe, seed)
    except GrowthError as e:
        raise UserError(f"cannot grow with {spec.op}: {e}") from None
    raise UserError(f"unknown growth operator '{spec.op}'; use one of {', '.join(OPS)}.")


def grow_checkpoint(source: str | Path, destination: str | Path, spec: GrowthSpec, *,
                    target_config: str | Path | None = None, carry_optimizer: bool = False,
                    log=print) -> Path:
    """Grow the checkpoint ``source`` (or a run directory's newest) into the run directory ``destination``; returns
    the new checkpoint. ``target_config`` gives the grown run's other sections (layout, steps, LR, ...)."""
    from pretrain.api import load_model

    step_dir = checkpoint.resolve(Path(source))
    dst = Path(destination)
    if checkpoint.complete_checkpoints(dst / "checkpoints"):
        raise UserError(f"'{dst}' already holds a run; grow into a new directory.")
    src_cfg = load_config(step_dir / "config.yaml")
    seed = src_cfg.train.seed
    state = checkpoint.read_state(step_dir)
    sg = src_cfg.model.ffn.self_guided
    if sg.enabled and state["step"] < src_cfg.guided_steps:
        raise UserError(f"'{step_dir}' is inside its self-guided phase (step {state['step']} of "
                        f"{src_cfg.guided_steps}), where every structured layer still carries a dense guide; grow "
                        "before the phase or after it.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _grow_sharded(step_dir, dst, spec, src_cfg, state, target_config, carry_optimizer, log)
    model_cfg, weights = src_cfg.model, load_model(step_dir).state_dict()
    if sg.enabled:  # (after the guided phase: refused within it)
        model_cfg, weights = _plain_structured(model_cfg, weights)
    grown = apply(spec, weights, model_cfg, seed)
    _require_growth(spec, model_cfg, grown.cfg)
    cfg = _target_run_config(src_cfg, grown.cfg, target_config, dst)
    require_writable_dir(dst, "the growth's destination")

    target = build_model(cfg.model, seed)
    target.load_state_dict(grown.state, strict=True)
    optimizer = build_optimizer(target, cfg.optim)
    if carry_optimizer:
        _carry_moments(step_dir, src_cfg, grown, target, optimizer, log)
    new_state = _grown_state(step_dir, src_cfg, cfg, spec, state)
    record = new_state["growth"][-1]
    (dst / "config.yaml").write_text(cfg.to_yaml())
    path = checkpoint.save(dst / "checkpoints", 0, lambda d: checkpoint.save_dcp(d, target, optimizer), new_state,
                           cfg.to_yaml(), keep=1)
    log(f"grew {step_dir} ({record['params_before'] / 1e6:.2f}M parameters, {cfg.model.num_layers} blocks now "
        f"from {src_cfg.model.num_layers}) by {spec.op} -> {path} ({record['params_after'] / 1e6:.2f}M parameters)")
    return path


def load_planned(plan: Plan, model: torch.nn.Module, source: Path) -> None:
    """Fill ``model`` (the grown model, built under any layout with its new tensors initialised by name and seed) as
    ``plan`` (``operators.depth_plan``) says, from the checkpoint ``source``: every rank reads the shards of the
    tensors it holds, so no rank ever holds the whole model; a source tensor that fills k grown ones is read in k
    passes. Then the scaled and the zeroed tensors."""
    reads: list[dict[str, str]] = []  # each pass names every source tensor at most once
    for name, how in plan.items():
        if isinstance(how, tuple):
            free = next((r for r in reads if how[0] not in r.values()), None)
            if free is None:
                reads.append(free := {})
            free[name] = how[0]
    for read in reads:
        checkpoint.load_dcp(source, model, None, names=lambda name, read=read: read.get(name))
    local = get_state_dict(model, [])[0]
    changed = {name: torch.zeros_like(local[name]) if how == "zero" else local[name] * how[1]
               for name, how in plan.items()
               if name in local and (how == "zero" or (isinstance(how, tuple) and how[1] != 1.0))}
    if changed:
        set_state_dict(model, [], model_state_dict=changed, optim_state_dict={}, options=StateDictOptions(strict=False))


def load_tensor_by_tensor(spec: GrowthSpec, src: ModelConfig, target: ModelConfig, seed: int, model: torch.nn.Module,
                          source: Path) -> None:
    """Width growth and upcycling under any layout: each grown tensor comes from at most one source tensor, so every
    rank reads that tensor whole, grows it and keeps its own shard, one tensor at a time (all ranks alike: the reads
    are collective). No rank holds more than one source and one grown tensor whole beyond its shards; tensors the
    operator makes new (an upcycled router) keep the grown model's initialisation by name and seed."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from pretrain.train.safe_load import read_dcp_metadata

    saved = read_dcp_metadata(source / ".metadata").state_dict_metadata
    with torch.device("meta"):
        names = list(Transformer(target).state_dict())  # every rank walks the whole model in one order
    spaces = width_spaces(src, target, seed) if spec.op == "width" else None
    mine = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        how, key = ("copy", name) if spec.op == "width" else upcycle_source(target, name)
        if key is not None:
            read = {key: torch.empty(saved[f"model.{key}"].size)}
            value = checkpoint.load_states(source, {"model": read})["model"][key]
        param = mine.get(name)
        if param is None or how == "fresh":
            continue
        shape = param.shape  # (a DTensor's global shape)
        if spec.op == "width":
            full = widen(name, value, spaces, shape)
        else:
            full = torch.zeros(shape) if how == "zero" else upcycled(how, value, shape)
        with torch.no_grad():
            if isinstance(param, DTensor):
                local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(local.to_local())
            else:
                param.copy_(full)


def _grow_sharded(step_dir: Path, dst: Path, spec: GrowthSpec, src_cfg: RunConfig, state: dict,
                  target_config: str | Path | None, carry_optimizer: bool, log) -> Path:
    """``grow_checkpoint`` under torchrun: the grown model is built under the target config's layout and filled by
    every rank from the shards it holds (depth operators)."""
    import torch.distributed as dist

    from pretrain import device as devices
    from pretrain.parallel import mesh
    from pretrain.train.engines import build_engine

    world = int(os.environ["WORLD_SIZE"])
    if carry_optimizer or src_cfg.model.ffn.self_guided.enabled:
        raise UserError("under torchrun, `pretrain grow` starts the grown model with a fresh optimizer, each rank "
                        "reading its shards; --carry-optimizer and self-guided models grow in one process: run it "
                        "without torchrun.")
    try:
        if spec.op in DEPTH_OPS:
            tcfg, plan = depth_plan(src_cfg.model, spec.op, spec.num_layers, spec.factor, spec.layers)
        elif spec.op == "width":
            tcfg = width_target(src_cfg.model, spec.hidden_factor, spec.ffn_size)
        elif spec.op == "upcycle" and spec.moe is not None:
            tcfg = upcycle_target(src_cfg.model, spec.moe)
        else:
            apply(spec, {}, src_cfg.model, 0)  # (says what is missing or unknown)
    except GrowthError as e:
        raise UserError(f"cannot grow with {spec.op}: {e}") from None
    _require_growth(spec, src_cfg.model, tcfg)
    cfg = _target_run_config(src_cfg, tcfg, target_config, dst)
    if cfg.parallel.world_size != world:
        raise UserError(f"{world} processes started, but the grown run's layout needs {cfg.parallel.world_size}; give "
                        "--config a target config whose parallel section uses them all, or start that many.")
    dims, device = mesh.setup(cfg.parallel, devices.resolve(cfg.train.device))
    if dims.rank == 0:
        require_writable_dir(dst, "the growth's destination")
    dist.barrier()
    engine = build_engine(cfg, dims, device, 0)
    if spec.op in DEPTH_OPS:
        load_planned(plan, engine.model, step_dir)
    else:
        load_tensor_by_tensor(spec, src_cfg.model, cfg.model, src_cfg.train.seed, engine.model, step_dir)
    new_state = _grown_state(step_dir, src_cfg, cfg, spec, state)
    if dims.rank == 0:
        (dst / "config.yaml").write_text(cfg.to_yaml())
    path = checkpoint.save(dst / "checkpoints", 0, engine.save_state, new_state, cfg.to_yaml(), keep=1)
    if dims.rank == 0:
        log(f"grew {step_dir} by {spec.op} on {world} processes, each holding its shards -> {path} "
            f"({num_params(cfg.model) / 1e6:.2f}M parameters, {cfg.model.num_layers} blocks)")
    del engine
    dist.destroy_process_group()
    return path


def _require_growth(spec: GrowthSpec, source: ModelConfig, target: ModelConfig) -> None:
    """The options must make the model larger: a copy of the source, or fewer blocks, is no growth."""
    if spec.op in DEPTH_OPS and target.num_layers <= source.num_layers:
        option = "--layers" if spec.layers else "--num-layers" if spec.num_layers else "--factor"
        raise UserError(f"{option} gives the grown model {target.num_layers} block(s) and the source has "
                        f"{source.num_layers}; depth growth adds blocks: give more.")
    if spec.op == "width" and (target.hidden_size, target.ffn_size) == (source.hidden_size, source.ffn_size):
        raise UserError(f"width growth needs --hidden-factor 2 or more, or an --ffn-size above the FFN's "
                        f"{source.ffn_size}: as given, the model stays as it is.")


def _grown_state(step_dir: Path, src_cfg: RunConfig, cfg: RunConfig, spec: GrowthSpec, state: dict) -> dict:
    """The grown run's starting trainer state: step 0, the data position and the compute spent, with the growth."""
    fpt = flops_per_token(src_cfg.model, src_cfg.data.seq_len)
    record = {"op": spec.op, "from": str(step_dir), "at_step": state["step"], "tokens": state["tokens"],
              "params_before": num_params(src_cfg.model), "params_after": num_params(cfg.model),
              "flops_before": state.get("flops", state["tokens"] * fpt)}
    return {"step": 0, "consumed_samples": state["consumed_samples"], "tokens": state["tokens"],
            "flops": record["flops_before"], "growth": [*state.get("growth", []), record]}


def _plain_structured(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict]:
    """A self-guided model past its guided phase as the plain structured model it has become: no wrappers (their
    names lose ``structured.``), so the grown model trains its structured layers alone."""
    ffn = dataclasses.replace(cfg.ffn, self_guided=dataclasses.replace(cfg.ffn.self_guided, enabled=False))
    return dataclasses.replace(cfg, ffn=ffn), {k.replace(".structured.", "."): v for k, v in state.items()
                                                if not k.endswith(".guide")}


def _target_run_config(src: RunConfig, model: ModelConfig, target_config: str | Path | None, dst: Path) -> RunConfig:
    base = load_config(target_config) if target_config else src
    if target_config:  # the target config's model section must describe the grown model (its other keys may differ)
        differ = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size" and
                  getattr(base.model, f.name) != getattr(model, f.name)]
        if differ:
            raise UserError(f"--config {target_config}: its model section differs from the grown model in "
                            f"{', '.join('model.' + k for k in differ)} (grown: "
                            f"{', '.join(f'{k}={getattr(model, k)!r}' for k in differ)}); set them so, or leave "
                            "them out of the target config.")
    cfg = dataclasses.replace(base, model=model)
    return cfg.replace(train={"run_dir": str(dst), "resume": "auto"})


def _carry_moments(step_dir: Path, src_cfg: RunConfig, grown: Grown, target: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, log) -> None:
    """AdamW moments of every copied tensor follow it (scaled as it was); new tensors start at zero."""
    source = build_model(src_cfg.model, src_cfg.train.seed)
    sg = src_cfg.model.ffn.self_guided
    if sg.enabled:
        set_guided_phase(source, checkpoint.read_state(step_dir)["step"], src_cfg.guided_steps)
    source_opt = build_optimizer(source, src_cfg.optim)
    checkpoint.load_dcp(step_dir, source, source_opt, no_dist=True)
    by_name = {k.replace(".structured.", "."): p for k, p in source.named_parameters()}
    carried = 0
    for name, param in target.named_parameters():
        origin = grown.origin.get(name)
        if origin is None or by_name.get(origin[0]) not in source_opt.state:
            continue
        moments, scale = source_opt.state[by_name[origin[0]]], origin[1]
        optimizer.state[param] = {"step": moments["step"].clone(),  # (an upcycled expert: the FFN's, per expert)
                                  "exp_avg": (moments["exp_avg"] * scale).expand_as(param).clone(),
                                  "exp_avg_sq": (moments["exp_avg_sq"] * scale * scale).expand_as(param).clone()}
        carried += 1
    log(f"carried the AdamW moments of {carried} of {len(list(target.parameters()))} tensors")
