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


def step_time(cfg: RunConfig, cluster: Cluster) -> StepTime:
    m, d, p, tr = cfg.model, cfg.data, cfg.parallel, cfg.train
    dev = cluster.device
    precision = "bf16" if tr.precision == "bf16" else "fp32"
    rate = dev.tflops[precision] * 1e12 * dev.efficiency
    act_bytes = 2 if precision == "bf16" else 4
    tokens = d.micro_batch_size * d.seq_len
    micro = d.global_batch_size // (d.micro_batch_size * p.dp)
    tp_span, ep_span = p.tp, p.tp * p.ep
    shard_span, rep_span, pp_span = p.tp * p.dp_shard, p.tp * p.dp, p.tp * p.dp * p.pp

    layers = stage_layers(cfg)
    per_rank = rank_stages(cfg)
    last = len(layers) - 1
    worst = {"F": 0.0, "I": 0.0, "W": 0.0, "tp": 0.0, "ep": 0.0, "pp": 0.0}
    dense_params = expert_params = 0.0  # the busiest rank's parameters, for data parallelism and the optimizer
    blocks_here = 1
    for stages in per_rank:
        flops = tp_comm = ep_comm = recomputed = 0.0  # per micro-batch, forward
        dense = experts = 0.0
        for s in stages:
            for i in layers[s]:
                bp = block_params(m, i)
                flops += 2.0 * _block_params(m, i, active=True) * tokens + 4.0 * d.seq_len * m.hidden_size * tokens
                tp_comm += 2 * _collective("all_reduce", tokens * m.hidden_size * act_bytes, p.tp, tp_span, cluster)
                if is_moe_block(m, i):
                    ep_comm += 2 * _collective("all_to_all", tokens * m.moe.top_k * m.hidden_size * act_bytes, p.ep,
                                               ep_span, cluster)
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
        f = flops / p.tp / rate
        send = _collective("send", tokens * m.hidden_size * act_bytes, 2, pp_span, cluster) if p.pp > 1 else 0.0
        # full: the forward again; selective: the elementwise ops again (read and write what they would have kept)
        recompute = f if tr.activation_checkpointing == "full" else 2 * recomputed / (dev.hbm_gbps * 1e9)
        cand = {"F": f + tp_comm + ep_comm + send, "I": f + recompute + tp_comm + ep_comm + send, "W": f,
                "tp": tp_comm, "ep": ep_comm, "pp": send}
        if cand["F"] + cand["I"] + cand["W"] > worst["F"] + worst["I"] + worst["W"]:
            worst, dense_params, expert_params = cand, dense, experts
            blocks_here = sum(len(layers[s]) for s in stages)
    spr = len(per_rank[0])
    # The simulator gives every stage the same durations: the busiest rank's, per stage it runs.
    f, i, w = worst["F"] / spr, worst["I"] / spr, worst["W"] / spr
    if p.pp > 1:
        makespan, bubble = _pipeline(p.pp_schedule, p.pp, micro, p.pp_virtual, f, i, w)
    else:
        makespan, bubble = micro * (f + i + w), 0.0
    busy_compute = micro * spr * (f + i + w) - micro * spr * ((worst["tp"] + worst["ep"] + worst["pp"]) / spr * 2)

    # Data parallelism: per rank and step.
    gathered = 2 if p.param_dtype == "bf16" else 4
    dp_comm = 0.0
    if p.engine == "deepspeed":
        n = p.dp_shard
        params = dense_params + expert_params
        per_micro = 0.0
        if p.zero_stage >= 3:
            per_micro = 2 * _collective("all_gather", 4 * params, n, shard_span, cluster)
        grads = _collective("reduce_scatter", 4 * params, n, shard_span, cluster)
        dp_comm = micro * (per_micro + grads) + (
            _collective("all_gather", 4 * params, n, shard_span, cluster) if p.zero_stage < 3 else 0.0)
    elif p.dp > 1:
        n, r = p.dp_shard, p.dp_replicate
        rounds = 1 if p.pp > 1 else micro  # the pipeline gathers and reduces once a step; FSDP2 each micro-batch
        gathers = 1 if (p.pp > 1 or not p.reshard_after_forward) else 2
        per = gathers * _collective("all_gather", gathered * dense_params, n, shard_span, cluster)
        per += _collective("reduce_scatter", 4 * dense_params, n, shard_span, cluster)
        per += _collective("all_reduce", 4 * dense_params / n, r, rep_span, cluster)
        if expert_params:  # expert-parallel weights: an all-reduce over the ranks that hold the same experts
            per += _collective("all_reduce", 4 * expert_params, p.dp // p.ep, rep_span, cluster)
        dp_comm = rounds * per
    compute = max(busy_compute, 1e-12)
    if not dev.overlap:
        exposed_dp = dp_comm
    else:
        exposed_dp = max(dp_comm - compute, dp_comm / (blocks_here + 1)) if dp_comm else 0.0
    local = (dense_params / (p.dp_shard if p.engine != "deepspeed" else p.dp_shard) + expert_params)
    optimizer = 28.0 * local / (dev.hbm_gbps * 1e9)
    seconds = makespan + exposed_dp + optimizer
    tokens_per_s = d.global_batch_size * d.seq_len / seconds
    model_flops = flops_per_token(m, d.seq_len) * tokens_per_s
    mfu = model_flops / (cluster.world * dev.tflops[precision] * 1e12)
    on_path = micro * spr * 2
    parts = {"compute": makespan * (1 - bubble) - on_path * (worst["tp"] + worst["ep"] + worst["pp"]) / spr,
             "bubble": makespan * bubble,
             "comm tensor parallel": on_path * worst["tp"] / spr,
             "comm expert parallel": on_path * worst["ep"] / spr,
             "comm pipeline sends": on_path * worst["pp"] / spr,
             "comm data parallel (exposed)": exposed_dp, "optimizer step": optimizer}
    return StepTime(seconds, tokens_per_s, mfu, bubble, parts)
