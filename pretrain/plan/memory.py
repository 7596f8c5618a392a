"""Memory of one rank of a run, by part, from the config and its layout alone (docs/planning.md).

Every part is a count of the tensors the code keeps, not a fit: the model state under FSDP2 / HSDP / DDP or a
DeepSpeed ZeRO stage, the weights FSDP gathers while it computes, the bf16 weight copies autocast makes, the
activations a micro-batch keeps for backward (per block kind, precision and activation-checkpointing mode,
counted tensor by tensor from what autograd saves in ``models/``), the logits and their gradient, and how many
micro-batches a pipeline schedule keeps alive on each rank (``parallel/schedules.py``, 2BP's pending weight
gradients included). The peak of a rank is the larger of the forward/backward peak and the optimizer step's.
The worst pipeline rank is reported; the others are in ``ranks``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from pretrain.config import RunConfig
from pretrain.config.model import ModelConfig
from pretrain.models.block import is_moe_block
from pretrain.models.transformer import _NORM_PARAMS, block_parts
from pretrain.parallel import schedules

GiB = 2**30


@dataclass
class BlockParams:
    """Parameters of one block by how the layout splits them."""
    tp_sharded: int  # attention and dense / structured FFN matrices: divided by tp
    whole: int  # norms, router and shared experts: whole on every tensor-parallel rank, FSDP-sharded
    routed: int  # routed experts: divided by ep when ep > 1 (then FSDP leaves them whole), else FSDP-sharded


def block_params(m: ModelConfig, i: int) -> BlockParams:
    p = block_parts(m, i)
    norms = (4 if m.norm_placement == "sandwich" else 2) * _NORM_PARAMS[m.norm](m.hidden_size)
    return BlockParams(p.attention + p.ffn, norms + p.router + p.shared_experts, p.num_experts * p.expert)


def activation_bytes_per_token(m: ModelConfig, i: int, precision: str, checkpointing: str, tp: int = 1,
                               sequence_parallel: bool = False) -> float:
    """Bytes one block keeps for backward per token of a micro-batch (the rank's share under tp).

    Counted from what autograd saves in our modules (pre-norm block, SwiGLU, sdpa/flash attention; fp32, or bf16
    autocast where the norms and the residual stream stay fp32): each RMSNorm keeps its input and the
    normalised input (fp32) and feeds the linear layers a copy in the matmul dtype; attention keeps q, k, v, its
    output and the log-sum-exp; the FFN keeps gate, up, SiLU(gate) and their product. ``full`` checkpointing
    keeps the block input only; ``selective`` keeps the block input and the outputs of matmuls and attention.
    The blocked CPU attention kernel's probabilities are ``attention_probability_bytes``."""
    d, kv, h = m.hidden_size, m.kv_heads * m.head_dim, m.num_heads
    bf16 = precision == "bf16"
    e = 2 if bf16 else 4  # matmul outputs
    seq_share = tp if sequence_parallel else 1  # the residual stream and the norms, sharded along the sequence
    if checkpointing == "full":
        return 4.0 * d / seq_share
    norms = 4 if m.norm_placement == "sandwich" else 2
    # Per norm: fp32 input and (RMSNorm) normalised input, and the output the next matmul reads (a bf16 copy
    # under autocast). LayerNorm keeps mean and rstd instead of the normalised input; DyT its input and tanh.
    per_norm = (4 + (0 if m.norm == "layernorm" else 4)) * d + (2 if bf16 else 4) * d
    extra_norms = (norms - 2) * (6 if bf16 else 8) * d  # sandwich's output norms feed no matmul
    replicated = 2 * per_norm + extra_norms + 4 * norms
    attn = ((5 if bf16 else 2) * d * e + (2 if bf16 else 2) * kv * e + 4 * h) / tp  # q (+ its RoPE pair in bf16), out, k, v
    if checkpointing == "selective":
        matmul_outs = (3 * d + 2 * kv) * e + 4 * h  # q, o_proj, down; k, v; lse
        return 4.0 * d / seq_share + matmul_outs / tp + _ffn_selective(m, i, e) / tp
    return replicated / seq_share + attn + _ffn_activation_bytes(m, i, e, tp)


def _ffn_selective(m: ModelConfig, i: int, e: int) -> float:
    if is_moe_block(m, i):
        moe = m.moe
        fe = moe.expert_ffn_hidden_size or m.ffn_size
        return moe.top_k * (2 * fe + 2 * m.hidden_size) * e + moe.num_shared_experts * 2 * fe * e
    return 2 * m.ffn_size * e


def _ffn_activation_bytes(m: ModelConfig, i: int, e: int, tp: int) -> float:
    d, f, ffn = m.hidden_size, m.ffn_size, m.ffn
    swiglu = ffn.activation == "swiglu"
    per_width = (4 if swiglu else 2) * e  # gate, up, SiLU(gate), product / pre- and post-GELU
    if is_moe_block(m, i):  # whole experts on every tp rank
        moe = m.moe
        fe = moe.expert_ffn_hidden_size or f
        # per routed token copy: its features in and out (fp32 dispatch/combine), the expert's inner tensors,
        # and the router's logits and probabilities per expert
        routed = moe.top_k * (per_width * fe + 8 * d + 40) + 8 * moe.num_experts + 4
        return routed + moe.num_shared_experts * per_width * fe
    out = per_width * f / tp
    if ffn.kind != "dense" and i >= ffn.dense_blocks:
        n_in = 2 if swiglu else 1
        if ffn.kind in ("lowrank", "blockdense"):
            middle = (n_in + 1) * ffn.rank
        else:  # blockshuffle: the middle features of each factorised layer, min(in, out) wide
            middle = (n_in + 1) * min(d, f)
        out += middle * e / tp
    return out


def attention_probability_bytes(m: ModelConfig, micro_batch: int, seq_len: int, precision: str, tp: int) -> float:
    """The blocked CPU attention kernel keeps 5/8 of the seq x seq probabilities of each head for backward."""
    return 5 / 8 * micro_batch * m.num_heads / tp * seq_len**2 * (2 if precision == "bf16" else 4)


@dataclass
class RankMemory:
    parts: dict[str, float] = field(default_factory=dict)  # bytes at the rank's peak, by part
    optimizer_peak: float = 0.0  # bytes while the optimizer steps (activations freed)

    @property
    def total(self) -> float:
        return max(sum(self.parts.values()), self.optimizer_peak)


@dataclass
class MemoryEstimate:
    ranks: list[RankMemory]  # one per pipeline rank (all data/tensor-parallel ranks of a stage alike)

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def total(self) -> float:
        return self.worst.total

    @property
    def worst_rank(self) -> int:
        return self.ranks.index(self.worst)


def in_flight(cfg: RunConfig) -> list[int]:
    """Micro-batches whose activations each pipeline rank holds at its peak (one without a pipeline), in units of
    one stage's activations for one micro-batch."""
    p, d = cfg.parallel, cfg.data
    if p.pp == 1:
        return [1]
    return list(_peaks(p.pp_schedule, p.pp, d.global_batch_size // (d.micro_batch_size * p.dp), p.pp_virtual))


@functools.lru_cache(maxsize=1024)
def _peaks(schedule: str, pp: int, micro: int, virtual: int) -> tuple[int, ...]:
    order = schedules.cached_order(schedule, pp, micro, virtual)
    stages = pp * schedules.stages_per_rank(schedule, virtual)
    peaks = schedules.simulate(order, stages, {"F": 1.0, "I": 1.0, "W": 1.0}).peak_activations
    return tuple(peaks.get(r, 0) for r in range(pp))


def rank_stages(cfg: RunConfig) -> list[list[int]]:
    """The stage indices of each pipeline rank."""
    p = cfg.parallel
    if p.pp == 1:
        return [[0]]
    ranks = schedules.stage_ranks(p.pp_schedule, p.pp, p.pp_virtual)
    out: list[list[int]] = [[] for _ in range(p.pp)]
    for stage, rank in sorted(ranks.items()):
        out[rank].append(stage)
    return out


def stage_layers(cfg: RunConfig) -> list[list[int]]:
    if cfg.parallel.pp == 1:
        return [list(range(cfg.model.num_layers))]
    from pretrain.parallel.stages import stage_blocks

    return [[int(k) for k in keys] for keys in stage_blocks(cfg)]


def estimate(cfg: RunConfig, device_type: str = "cuda") -> MemoryEstimate:
    """Per-rank memory of ``cfg`` (vocab_size resolved, precision concrete). ``device_type`` decides whether the
    blocked attention kernel's probabilities count (``model.attention_kernel``)."""
    import torch

    from pretrain.models.attention import uses_blocked_kernel

    m, d, p, tr = cfg.model, cfg.data, cfg.parallel, cfg.train
    precision = "bf16" if tr.precision == "bf16" else "fp32"
    tokens = d.micro_batch_size * d.seq_len
    deepspeed = p.engine == "deepspeed"
    fsdp = p.dp_shard > 1 and not deepspeed  # dp_replicate alone keeps whole weights: nothing to gather
    state_shards = p.dp_shard if fsdp else 1  # FSDP shards over dp_shard; dp_replicate replicates
    gathered_bytes = 2 if p.param_dtype == "bf16" else 4
    autocast_copies = precision == "bf16" and not (fsdp and p.param_dtype == "bf16")
    blocked = uses_blocked_kernel(m.attention_kernel, torch.device(device_type), precision, tr.compile)
    layers_of_stage = stage_layers(cfg)
    counts = in_flight(cfg)
    last_stage = len(layers_of_stage) - 1
    ranks = []
    for r, stages in enumerate(rank_stages(cfg)):
        dense = experts = 0  # parameters this rank holds before FSDP sharding (dense: after tp)
        acts = 0.0  # one micro-batch through all this rank's stages
        largest_block = 0
        for s in stages:
            for i in layers_of_stage[s]:
                bp = block_params(m, i)
                dense += bp.tp_sharded // p.tp + bp.whole + (bp.routed if p.ep == 1 else 0)
                experts += bp.routed // p.ep if p.ep > 1 else 0
                largest_block = max(largest_block, bp.tp_sharded // p.tp + bp.whole + bp.routed // p.ep)
                acts += tokens * activation_bytes_per_token(m, i, precision, tr.activation_checkpointing, p.tp,
                                                            p.sequence_parallel)
                if blocked and tr.activation_checkpointing != "full":
                    acts += attention_probability_bytes(m, d.micro_batch_size, d.seq_len, precision, p.tp)
            if s == 0:
                dense += m.vocab_size * m.hidden_size // p.tp
                acts += tokens * 4 * m.hidden_size / (p.tp if p.sequence_parallel else 1)  # embedding output
            if s == last_stage:
                dense += _NORM_PARAMS[m.norm](m.hidden_size)
                if not m.tie_embeddings or 0 not in stages:
                    dense += m.vocab_size * m.hidden_size // p.tp
        holds_head = last_stage in stages
        num_stages_here = len(stages)
        per_stage_acts = acts / num_stages_here
        parts: dict[str, float] = {}
        params = dense + experts
        if deepspeed:
            z, dp = p.zero_stage, p.dp_shard
            parts["weights (fp32)"] = 4.0 * params / (dp if z >= 3 else 1)
            parts["gradients (fp32)"] = 4.0 * params / (dp if z >= 2 else 1)
            parts["AdamW moments"] = 0.0 if p.offload_optimizer else 8.0 * params / dp
            if z >= 3:  # the layer being computed, gathered
                parts["gathered weights (ZeRO-3, two blocks)"] = 2 * 4.0 * largest_block
        else:
            # Experts are sharded over ep only (FSDP leaves them whole); dense weights over dp_shard.
            sharded = dense / state_shards + experts
            parts["weights (fp32)"] = 4.0 * sharded
            parts["gradients (fp32)"] = 4.0 * sharded
            parts["AdamW moments"] = 8.0 * sharded
            if fsdp and p.pp > 1:
                # The schedule gathers each stage once per step and keeps it, and accumulates unsharded gradients
                # over the micro-batches (reduced once, at the end).
                parts["gathered weights (kept for the step)"] = gathered_bytes * dense
                parts["unsharded gradients (accumulated)"] = gathered_bytes * dense
            elif fsdp and not p.reshard_after_forward:
                parts["gathered weights (kept forward to backward)"] = gathered_bytes * dense
                parts["unsharded gradients (one block)"] = gathered_bytes * largest_block
            elif fsdp:
                root = m.vocab_size * m.hidden_size // p.tp * (1 if m.tie_embeddings else 2)
                parts["gathered weights (root + two blocks)"] = gathered_bytes * (root + 2 * largest_block)
                parts["unsharded gradients (one block)"] = gathered_bytes * largest_block
        if autocast_copies:  # bf16 copies autocast makes of each weight, kept for backward by each micro-batch
            keep = 1 if tr.activation_checkpointing == "full" else counts[r] / num_stages_here
            parts["bf16 weight copies (autocast)"] = 2.0 * params * max(keep, 1)
        parts["activations kept for backward"] = per_stage_acts * counts[r]
        if tr.activation_checkpointing == "full":  # one block recomputed at a time in backward
            biggest = max(activation_bytes_per_token(m, i, precision, "none", p.tp, p.sequence_parallel)
                          for s in stages for i in layers_of_stage[s]) if any(layers_of_stage[s] for s in stages) else 0
            parts["recomputed block"] = tokens * biggest + (
                attention_probability_bytes(m, d.micro_batch_size, d.seq_len, precision, p.tp) if blocked else 0)
        if holds_head:  # logits (+ their fp32 copy for the loss in bf16) kept, and their gradient in backward
            logit_bytes = (6 if precision == "bf16" else 8) + 4
            parts["logits and their gradient"] = logit_bytes * tokens * m.vocab_size / (p.tp if p.loss_parallel else 1)
        state = parts["weights (fp32)"] + parts["gradients (fp32)"] + parts["AdamW moments"]
        # The foreach AdamW step makes one temporary per parameter (sqrt of the second moment).
        step_temp = parts["weights (fp32)"] if not (deepspeed and p.offload_optimizer) else 0.0
        ranks.append(RankMemory(parts, state + step_temp))
    return MemoryEstimate(ranks)


def describe(mem: RankMemory) -> str:
    return ", ".join(f"{name} {size / GiB:.2f} GiB" for name, size in mem.parts.items() if size)
