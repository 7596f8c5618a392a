"""The model split into pipeline stages (docs/parallelism.md).

``parallel.pp x parallel.pp_virtual`` stages, contiguous in depth: the embedding opens stage 0, the final norm
and LM head close the last one, and the blocks are placed by ``parallel.pp_layout`` or by the cost model
``stage_costs`` (minimising the most expensive stage). Each rank keeps only its stages' modules in its model;
``blocks`` keeps the global keys, so parameter names, optimizer state and checkpoints are the whole model's
and resume under any layout. A ``StageModule`` runs one stage and shares its modules with the rank's model.

MoE router losses need nothing here: each MoE layer attaches its own to its output (``models.moe``), so they
get their gradient in whichever stage computed them and no loss value travels between stages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace

import torch
from torch import nn

from pretrain.config import RunConfig
from pretrain.models.moe import MoEContext
from pretrain.models.transformer import _block_params
from pretrain.parallel import schedules


def stage_costs(cfg: RunConfig) -> tuple[float, list[float], float]:
    """(embedding, each block, final norm + head) in training FLOPs per token: 6 x the matmul parameters a
    token uses plus attention 12 x seq x d (as ``flops_per_token``), and the AdamW step (~16 FLOPs per
    parameter) spread over a step's tokens. The embedding does no matmul: a lookup and a gradient scatter
    per token (2 d) and its whole table in the optimizer step."""
    m, d = cfg.model, cfg.data
    dp = cfg.parallel.dp_replicate * cfg.parallel.dp_shard
    step_tokens = d.global_batch_size // dp * d.seq_len
    table = m.vocab_size * m.hidden_size
    blocks = []
    for i in range(m.num_layers):
        active, total = _block_params(m, i, active=True), _block_params(m, i, active=False)
        blocks.append(6.0 * active + 12.0 * d.seq_len * m.hidden_size + 16.0 * total / step_tokens)
    embed = 2.0 * m.hidden_size + 16.0 * table / step_tokens
    head = 6.0 * table + (0.0 if m.tie_embeddings else 16.0 * table / step_tokens)
    return embed, blocks, head


def balance(embed: float, blocks: list[float], head: float, num_stages: int,
            ranks: list[int] | None = None) -> list[int]:
    """Blocks per stage (each at least one), the embedding counted in the first stage and the head in the
    last. Stages are first balanced on their own: a linear-partition dynamic program minimising the largest
    stage cost. When a rank runs several stages (``ranks[s]``: the rank of stage s; interleaved and V
    schedules), what bounds the step is the rank's summed cost, so blocks then move across stage boundaries,
    one at a time, while that lowers the rank loads (sorted from the largest, compared in that order; ties
    go to the smaller largest stage)."""
    counts = _balance_stages(embed, blocks, head, num_stages)
    if ranks is None or len(set(ranks)) == len(ranks):
        return counts

    def key(c: list[int]) -> tuple:
        costs = _stage_costs(c, embed, blocks, head)
        loads = [0.0] * (max(ranks) + 1)
        for stage, cost in enumerate(costs):
            loads[ranks[stage]] += cost
        return tuple(sorted(loads, reverse=True)), max(costs)

    best = key(counts)
    while True:
        moves = []
        for src in range(num_stages):  # one block fewer on stage src, one more on dst (the stages between shift)
            for dst in range(num_stages):
                if src != dst and counts[src] > 1:
                    moved = list(counts)
                    moved[src] -= 1
                    moved[dst] += 1
                    moves.append(moved)
        if not moves:
            return counts
        candidate = min(moves, key=key)
        if key(candidate) >= best:
            return counts
        counts, best = candidate, key(candidate)


def _stage_costs(counts: list[int], embed: float, blocks: list[float], head: float) -> list[float]:
    starts = [sum(counts[:s]) for s in range(len(counts) + 1)]
    costs = [sum(blocks[starts[s]:starts[s + 1]]) for s in range(len(counts))]
    costs[0] += embed
    costs[-1] += head
    return costs


def _balance_stages(embed: float, blocks: list[float], head: float, num_stages: int) -> list[int]:
    """Blocks per stage minimising the largest stage cost (a linear-partition dynamic program)."""
    n = len(blocks)
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, lo: int, hi: int) -> float:  # blocks lo..hi-1 on ``stage``
        return prefix[hi] - prefix[lo] + (embed if stage == 0 else 0.0) + (head if stage == num_stages - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]  # best[s][j]: first j blocks on s stages
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, n - (num_stages - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    counts, j = [], n
    for s in range(num_stages, 0, -1):
        counts.append(j - cut[s][j])
        j = cut[s][j]
    return counts[::-1]


@functools.lru_cache(maxsize=1024)
def _cached_balance(embed: float, blocks: tuple[float, ...], head: float, num_stages: int,
                    ranks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(balance(embed, list(blocks), head, num_stages, list(ranks)))


def _balanced(costs: tuple[float, list[float], float], num_stages: int, ranks: tuple[int, ...]) -> list[int]:
    """``balance`` once per distinct costs (a layout search asks for the same split many times)."""
    embed, blocks, head = costs
    return list(_cached_balance(embed, tuple(blocks), head, num_stages, ranks))


def stage_blocks(cfg: RunConfig) -> list[list[str]]:
    """The global block keys of every stage, in stage order."""
    p, num_layers = cfg.parallel, cfg.model.num_layers
    num_stages = p.pp * schedules.stages_per_rank(p.pp_schedule, p.pp_virtual)
    ranks = schedules.stage_ranks(p.pp_schedule, p.pp, p.pp_virtual)
    counts = list(p.pp_layout) or _balanced(stage_costs(cfg), num_stages, tuple(ranks[s] for s in range(num_stages)))
    starts = [sum(counts[:s]) for s in range(num_stages + 1)]
    layout = [[str(i) for i in range(starts[s], starts[s + 1])] for s in range(num_stages)]
    placed = [int(k) for keys in layout for k in keys]
    assert sorted(placed) == list(range(num_layers)) and len(placed) == num_layers, (
        f"every block must be placed exactly once, got {layout}")
    return layout


class StageModule(nn.Module):
    """One pipeline stage: the embedding (first stage), a contiguous run of blocks under their global keys,
    the final norm and head (last stage). With tied embeddings both end stages hold embed and head, so the
    shared weight is one parameter of the stage whichever module names it."""

    def __init__(self, model: nn.Module, keys: list[str], first: bool, last: bool, tied: bool,
                 autocast: Callable[[], AbstractContextManager], moe: MoEContext | None = None):
        super().__init__()
        self.first, self.last = first, last
        if first or (tied and last):
            self.embed = model.embed
        self.blocks = nn.ModuleDict({k: model.blocks[k] for k in keys})
        if last:
            self.norm = model.norm
        if last or (tied and first):
            self.head = model.head
        self.rope = model.rope
        self.embedded: torch.Tensor | None = None  # the first stage's embedding output of its latest forward
        self.autocast, self.moe = autocast, moe

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """h: token ids (first stage) or the previous stage's hidden states; tokens: the ids (hash routing)."""
        with self.autocast():
            if self.first:
                h = self.embedded = self.embed(h)  # kept for the split backward (``Stage``)
            rope = self.rope(tokens.shape[1], tokens.device)
            for block in self.blocks.values():
                h = block(h, rope, tokens, moe=self.moe)
            if self.last:
                h = self.head(self.norm(h))
        return h


def split_model(model: nn.Module, cfg: RunConfig, pp_rank: int, autocast: Callable[[], AbstractContextManager],
                moe: MoEContext | None = None) -> tuple[list[int], list[StageModule]]:
    """Keep this rank's stages in ``model`` (in place) and return their indices and stage modules."""
    p = cfg.parallel
    layout = stage_blocks(cfg)
    ranks = schedules.stage_ranks(p.pp_schedule, p.pp, p.pp_virtual)
    local = [s for s in range(len(layout)) if ranks[s] == pp_rank]
    last = len(layout) - 1
    tied = cfg.model.tie_embeddings
    modules = [StageModule(model, layout[s], s == 0, s == last, tied, autocast, moe) for s in local]
    keep = {k for s in local for k in layout[s]}
    for key in list(model.blocks):
        if key not in keep:
            del model.blocks[key]
    holds_end = 0 in local or last in local
    if 0 not in local and not (tied and holds_end):
        model.embed = None
    if last not in local:
        model.norm = None
        if not (tied and holds_end):
            model.head = None
    if tied and not holds_end:  # a middle stage holds neither end, so nothing is tied here
        model.cfg = replace(model.cfg, tie_embeddings=False)
    return local, modules
