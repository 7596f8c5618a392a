"""The network an incubation trains: the meta model (one block per module, trained end to end first) with its block
k replaced by the full module k of the target, freshly initialised.

Only module k learns: its blocks, plus the embedding or the final norm and head when module k owns them. Everything
else is the meta model's and frozen (``requires_grad`` off): the blocks before module k then keep no activations for
backward (nothing upstream of them needs a gradient), and the blocks after it pass the gradient through to module k
without computing their own weights' gradients. Module k's blocks carry their global depth in the target
(``layer_idx``), so LayerNorm Scaling, Mix-LN placement and MoE placement are the target's, and their weights start
as the target's would (initialised by the target's names and seed). Hybrid block i of module k is target block
``start_k + i - (k - 1)``: ``target_name`` maps the names."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from pretrain.config import RunConfig
from pretrain.models.block import Block
from pretrain.models.transformer import Transformer, _block_params, init_weights

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def meta_model_config(cfg: RunConfig):
    """The meta model: the target's width, one block per module."""
    return dataclasses.replace(cfg.model, num_layers=cfg.assembly.modules)


def hybrid_config(cfg: RunConfig) -> RunConfig:
    """The incubation of module k as a plain config of the hybrid's depth: what pipeline stages are cut by (the
    stages balance the hybrid's blocks; ``parallel.pp_layout`` is the target's and does not apply)."""
    from pretrain.config import ConfigError

    k, p = cfg.assembly.module, cfg.parallel
    depth = len(hybrid_layout(cfg, k))
    stages = p.pp * p.pp_virtual
    if p.pp > 1 and depth < stages:
        raise ConfigError("parallel.pp", f"module {k}'s incubation runs {depth} blocks ({cfg.assembly.modules - 1} meta "
                          f"blocks and module {k}'s {depth - cfg.assembly.modules + 1}), fewer than its pipeline stages; "
                          f"give the incubations fewer stages (e.g. parallel.pp=1 on their command line).")
    return cfg.replace(model={"num_layers": depth}, parallel={"pp_layout": []},
                       assembly={"modules": 0, "module_blocks": [], "phase": "", "module": 0})


def hybrid_layout(cfg: RunConfig, k: int) -> list[tuple[str, int]]:
    """For each hybrid block: ("meta", meta block) or ("module", global target block)."""
    a = cfg.assembly
    starts = a.starts(cfg.model.num_layers)
    layout = [("meta", m) for m in range(k - 1)]
    layout += [("module", b) for b in range(starts[k - 1], starts[k])]
    return layout + [("meta", m) for m in range(k, a.modules)]


def target_name(cfg: RunConfig, k: int, name: str) -> str:
    """The target model's name for a hybrid parameter of module k (blocks renumbered, the rest unchanged)."""
    match = _BLOCK.match(name)
    if match is None:
        return name
    kind, index = hybrid_layout(cfg, k)[int(match.group(1))]
    assert kind == "module", name
    return f"blocks.{index}.{match.group(2)}"


def checkpoint_name(cfg: RunConfig, k: int, name: str) -> str | None:
    """The name under which an incubation's checkpoint keeps hybrid tensor ``name``: the target's, for what module k
    owns; None (not kept) for the frozen meta parts."""
    return target_name(cfg, k, name) if owned(cfg, k, name) else None


def owner(cfg: RunConfig, name: str) -> int:
    """The module (1..K) that trains the target model's tensor ``name``."""
    a = cfg.assembly
    match = _BLOCK.match(name)
    if match is not None:
        starts = a.starts(cfg.model.num_layers)
        return next(k for k in range(1, a.modules + 1) if int(match.group(1)) < starts[k])
    return a.embedding_module if name.startswith("embed.") else a.head_owner


def owned(cfg: RunConfig, k: int, name: str) -> bool:
    """Whether module k trains (and checkpoints) the hybrid parameter ``name``."""
    a = cfg.assembly
    match = _BLOCK.match(name)
    if match is not None:
        return hybrid_layout(cfg, k)[int(match.group(1))][0] == "module"
    if name.startswith("embed."):
        return k == a.embedding_module
    return k == a.head_owner  # final norm and head


def build_hybrid(cfg: RunConfig, meta_checkpoint: Path, device: torch.device) -> nn.Module:
    """The hybrid of module ``cfg.assembly.module``: the trained meta model's weights (from ``meta_checkpoint``),
    module k initialised as the target's, everything else frozen."""
    from pretrain.api import load_model

    a, seed = cfg.assembly, cfg.train.seed
    k = a.module
    meta = load_model(meta_checkpoint)
    layout = hybrid_layout(cfg, k)
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg.model, num_layers=len(layout)))
        for i, (kind, index) in enumerate(layout):
            model.blocks[str(i)] = Block(meta.cfg if kind == "meta" else cfg.model, index)
    model.to_empty(device=device)
    model.tie_weights()
    # What module k owns starts as the target's own initial weights (initialised under the target's names)...
    fresh = {"blocks": nn.ModuleDict({str(b): model.blocks[str(i)] for i, (kind, b) in enumerate(layout)
                                      if kind == "module"})}
    if k == a.embedding_module:
        fresh["embed"] = model.embed
    if k == a.head_owner:
        fresh.update(norm=model.norm, head=model.head)
    init_weights(nn.ModuleDict(fresh), seed, cfg.model.init_std)
    # ... and the rest is the trained meta model's, frozen.
    source = meta.state_dict()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if owned(cfg, k, name):
                continue
            match = _BLOCK.match(name)
            param.copy_(source[name if match is None else f"blocks.{layout[int(match.group(1))][1]}.{match.group(2)}"])
            param.requires_grad_(False)
    return model


def incubation_flops_per_token(cfg: RunConfig) -> float:
    """Training FLOPs per token of an incubation: a forward through everything (2 x matmul parameters, attention as
    ``flops_per_token`` counts it), input gradients through module k and the meta blocks after it, weight gradients
    of module k only (2 x parameters each)."""
    a, m, seq = cfg.assembly, cfg.model, cfg.data.seq_len
    meta = meta_model_config(cfg)
    k = a.module
    layout = hybrid_layout(cfg, k)
    attention = 2.0 * seq * m.hidden_size  # per block and pass, as flops_per_token's 12 L s d over its 6 passes
    flops = 0.0
    for position, (kind, index) in enumerate(layout):
        params = _block_params(meta if kind == "meta" else m, index, active=True)
        after = position >= k - 1  # module k itself, or a meta block after it: the gradient passes through
        flops += (2.0 * params + attention) * (1 + (1 if after else 0) + (1 if kind == "module" else 0))
    head = m.vocab_size * m.hidden_size
    flops += 2.0 * head * (3 if k == a.head_owner else 2)
    return flops
