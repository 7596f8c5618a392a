"""Step time of a run on a cluster, by part (docs/planning.md).

Compute: each pipeline stage's training FLOPs per token (6 x the matmul parameters a token uses + 12 x seq x d
for attention, the model's cost model) over the device's achieved matmul rate (datasheet peak x utilisation),
split into forward F, input backward I and weight backward W (1 : 1 : 1; full activation checkpointing adds a
forward to I). Communication: the bytes each collective moves per rank (ring all-gather / reduce-scatter
(n-1)/n x the tensor, all-reduce twice that, all-to-all (n-1)/n) over the link the group spans (NVLink inside a
node, the network between nodes; tp is the innermost mesh dimension, then ep / dp_shard, dp_replicate, pp).
Tensor- and expert-parallel collectives sit on the critical path inside F and I; pipeline sends too. The step of
a pipeline is the schedule simulator's makespan with those F, I, W (so the bubble is the simulator's); data-
parallel traffic overlaps the compute except what exceeds it and the first block's gather. The optimizer step is
memory bound (28 bytes read and written per local parameter over the memory bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from pretrain.config import RunConfig
from pretrain.models.block import is_moe_block
from pretrain.models.transformer import _block_params, flops_per_token
from pretrain.parallel import schedules
from pretrain.plan.hardware import BUS_EFFICIENCY, LATENCY_S, Device
from pretrain.plan.memory import activation_bytes_per_token, block_params, rank_stages, stage_layers


@dataclass
class Cluster:
    device: Device
    nodes: int
    gpus_per_node: int
    network_gbps: float  # per GPU between nodes, one direction

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def link(self, span: int) -> tuple[float, float]:
        """(bytes/s, latency) of a group whose ranks lie within ``span`` consecutive ranks."""
        if span <= self.gpus_per_node:
            return self.device.intra_gbps * 1e9 * BUS_EFFICIENCY, self.device.latency_s
        return (min(self.network_gbps, self.device.intra_gbps) * 1e9 * BUS_EFFICIENCY,
                max(LATENCY_S["inter"], self.device.latency_s))


@dataclass
class StepTime:
    seconds: float
    tokens_per_s: float
    mfu: float
    bubble: float
    parts: dict[str, float] = field(default_factory=dict)  # seconds on the critical path, by part

    @property
    def comm_share(self) -> float:
        return sum(v for k, v in self.parts.items() if k.startswith("comm")) / self.seconds


def _collective(kind: str, nbytes: float, n: int, span: int, cluster: Cluster) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, latency = cluster.link(span)
    factor = {"all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "all_reduce": 2 * (n - 1) / n,
              "all_to_all": (n - 1) / n, "send": 1.0}[kind]
    steps = {"all_reduce": 2 * (n - 1), "send": 1}.get(kind, n - 1)
    return factor * nbytes / bw + steps * latency


def _pipeline(schedule: str, pp: int, micro: int, virtual: int, f: float, i: float, w: float) -> tuple[float, float]:
    """(makespan, bubble) of the schedule: simulated with I and W in units of F rounded to 1% (the makespan
    scales with the durations), so a search simulates each shape a few times, not once per layout."""
    makespan, bubble = _unit_pipeline(schedule, pp, micro, virtual, round(i / f, 2), round(w / f, 2))
    return makespan * f, bubble


@lru_cache(maxsize=4096)
def _unit_pipeline(schedule: str, pp: int, micro: int, virtual: int, i: float, w: float) -> tuple[float, float]:
    order = schedules.cached_order(schedule, pp, micro, virtual)
    stages = pp * schedules.stages_per_rank(schedule, virtual)
    t = schedules.simulate(order, stages, {"F": 1.0, "I": i, "W": w})
    return t.makespan, t.bubble_fraction


@dataclass
class _RankCost:
    """The busiest pipeline rank's durations per micro-batch (all of its stages together, seconds) and the
    parameters it holds (for data-parallel traffic and the optimizer step)."""
    durations: dict[str, float]  # F, I, W; and the collectives inside them: tp, ep, pp
    dense_params: float = 0.0  # everything but expert-parallel weights, tp-sharded where tp shards it
    expert_params: float = 0.0  # this rank's experts under ep > 1
    blocks: int = 1

    @property
    def total(self) -> float:
        return self.durations["F"] + self.durations["I"] + self.durations["W"]


def _rank_cost(cfg: RunConfig, cluster: Cluster, stages: list[int], precision: str) -> _RankCost:
    """What one pipeline rank running ``stages`` spends per micro-batch, and the parameters it holds."""
    m, d, p, tr = cfg.model, cfg.data, cfg.parallel, cfg.train
    act_bytes = 2 if precision == "bf16" else 4
    tokens = d.micro_batch_size * d.seq_len
    layers = stage_layers(cfg)
    last = len(layers) - 1
    flops = tp_comm = ep_comm = recomputed = 0.0  # per micro-batch, forward
    dense = experts = 0.0
    for s in stages:
        for i in layers[s]:
            bp = block_params(m, i)
            flops += 2.0 * _block_params(m, i, active=True) * tokens + 4.0 * d.seq_len * m.hidden_size * tokens
            tp_comm += 2 * _collective("all_reduce", tokens * m.hidden_size * act_bytes, p.tp, p.tp, cluster)
            if is_moe_block(m, i):
                ep_comm += 2 * _collective("all_to_all", tokens * m.moe.top_k * m.hidden_size * act_bytes, p.ep,
                                           p.tp * p.ep, cluster)
            dense += bp.tp_sharded / p.tp + bp.whole + (bp.routed if p.ep == 1 else 0)
            experts += bp.routed / p.ep if p.ep > 1 else 0
            if tr.activation_checkpointing == "selective":  # norms, activations, RoPE again: memory bound
                recomputed += tokens * (activation_bytes_per_token(m, i, precision, "none", p.tp)
                                        - activation_bytes_per_token(m, i, precision, "selective", p.tp))
        if s == 0:
            dense += m.vocab_size * m.hidden_size / p.tp
        if s == last:
            flops += 2.0 * m.vocab_size * m.hidden_size * tokens
            if not m.tie_embeddings or 0 not in stages:
                dense += m.vocab_size * m.hidden_size / p.tp
    dev = cluster.device
    f = flops / p.tp / (dev.tflops[precision] * 1e12 * dev.efficiency)
    send = (_collective("send", tokens * m.hidden_size * act_bytes, 2, p.tp * p.dp * p.pp, cluster)
            if p.pp > 1 else 0.0)
    # full: the forward again; selective: the elementwise ops again (read and write what they would have kept)
    recompute = f if tr.activation_checkpointing == "full" else 2 * recomputed / (dev.hbm_gbps * 1e9)
    comm = tp_comm + ep_comm + send
    return _RankCost({"F": f + comm, "I": f + recompute + comm, "W": f, "tp": tp_comm, "ep": ep_comm, "pp": send},
                     dense, experts, sum(len(layers[s]) for s in stages))


def _data_parallel_seconds(cfg: RunConfig, cluster: Cluster, busiest: _RankCost, micro: int) -> float:
    """Seconds of data-parallel traffic per rank and step (before any overlap with the compute)."""
    p = cfg.parallel
    shard_span, rep_span = p.tp * p.dp_shard, p.tp * p.dp
    dense, experts = busiest.dense_params, busiest.expert_params
    if p.engine == "deepspeed":
        n, params = p.dp_shard, dense + experts
        per_micro = 2 * _collective("all_gather", 4 * params, n, shard_span, cluster) if p.zero_stage >= 3 else 0.0
        grads = _collective("reduce_scatter", 4 * params, n, shard_span, cluster)
        gather_after_step = _collective("all_gather", 4 * params, n, shard_span, cluster) if p.zero_stage < 3 else 0.0
        return micro * (per_micro + grads) + gather_after_step
    if p.dp == 1:
        return 0.0
    n, r = p.dp_shard, p.dp_replicate
    gathered = 2 if p.param_dtype == "bf16" else 4
    rounds = 1 if p.pp > 1 else micro  # the pipeline gathers and reduces once a step; FSDP2 each micro-batch
    gathers = 1 if (p.pp > 1 or not p.reshard_after_forward) else 2
    per = gathers * _collective("all_gather", gathered * dense, n, shard_span, cluster)
    per += _collective("reduce_scatter", 4 * dense, n, shard_span, cluster)
    per += _collective("all_reduce", 4 * dense / n, r, rep_span, cluster)
    if experts:  # expert-parallel weights: an all-reduce over the ranks that hold the same experts
        per += _collective("all_reduce", 4 * experts, p.dp // p.ep, rep_span, cluster)
    return rounds * per


def step_time(cfg: RunConfig, cluster: Cluster) -> StepTime:
    m, d, p = cfg.model, cfg.data, cfg.parallel
    dev = cluster.device
    precision = "bf16" if cfg.train.precision == "bf16" else "fp32"
    micro = d.global_batch_size // (d.micro_batch_size * p.dp)
    per_rank = rank_stages(cfg)
    busiest = max((_rank_cost(cfg, cluster, stages, precision) for stages in per_rank), key=lambda c: c.total)
    spr = len(per_rank[0])
    # The simulator gives every stage the same durations: the busiest rank's, per stage it runs.
    per_stage = {k: v / spr for k, v in busiest.durations.items()}
    f, i, w = per_stage["F"], per_stage["I"], per_stage["W"]
    if p.pp > 1:
        makespan, bubble = _pipeline(p.pp_schedule, p.pp, micro, p.pp_virtual, f, i, w)
    else:
        makespan, bubble = micro * (f + i + w), 0.0
    on_path = micro * spr * 2  # every stage's F and I carry its collectives
    comm_on_path = {k: on_path * per_stage[k] for k in ("tp", "ep", "pp")}
    busy_compute = micro * spr * (f + i + w) - sum(comm_on_path.values())

    dp_comm = _data_parallel_seconds(cfg, cluster, busiest, micro)
    if not dev.overlap:
        exposed_dp = dp_comm
    else:  # what exceeds the compute, and at least the first block's share (nothing to hide it behind)
        exposed_dp = max(dp_comm - max(busy_compute, 1e-12), dp_comm / (busiest.blocks + 1)) if dp_comm else 0.0
    local = busiest.dense_params / p.dp_shard + busiest.expert_params
    optimizer = 28.0 * local / (dev.hbm_gbps * 1e9)
    seconds = makespan + exposed_dp + optimizer
    tokens_per_s = d.global_batch_size * d.seq_len / seconds
    mfu = flops_per_token(m, d.seq_len) * tokens_per_s / (cluster.world * dev.tflops[precision] * 1e12)
    parts = {"compute": makespan * (1 - bubble) - sum(comm_on_path.values()),
             "bubble": makespan * bubble,
             "comm tensor parallel": comm_on_path["tp"],
             "comm expert parallel": comm_on_path["ep"],
             "comm pipeline sends": comm_on_path["pp"],
             "comm data parallel (exposed)": exposed_dp, "optimizer step": optimizer}
    return StepTime(seconds, tokens_per_s, mfu, bubble, parts)
