"""`pretrain plan`: every layout of a run config on a cluster that the trainer accepts, with its memory per rank
and predicted step time; the ones that fit, ranked by predicted tokens/s (docs/planning.md)."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from dataclasses import dataclass

from pretrain.config import ConfigError, RunConfig
from pretrain.config.parallel import check_layout
from pretrain.plan.memory import MemoryEstimate, estimate
from pretrain.plan.timing import Cluster, StepTime, step_time

SCHEDULES = [("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2), ("1f1b_2bp", 1)]
CHECKPOINTING = ["none", "selective", "full"]


@dataclass
class Candidate:
    cfg: RunConfig
    memory: MemoryEstimate
    time: StepTime
    fits: bool

    @property
    def overrides(self) -> list[str]:
        p, d, tr = self.cfg.parallel, self.cfg.data, self.cfg.train
        out = [f"parallel.tp={p.tp}", f"parallel.pp={p.pp}", f"parallel.dp_shard={p.dp_shard}",
               f"parallel.dp_replicate={p.dp_replicate}", f"parallel.ep={p.ep}"]
        if p.pp > 1:
            out += [f"parallel.pp_schedule={p.pp_schedule}", f"parallel.pp_virtual={p.pp_virtual}"]
        return out + [f"train.activation_checkpointing={tr.activation_checkpointing}",
                      f"data.micro_batch_size={d.micro_batch_size}"]

    def row(self) -> dict:
        p, d = self.cfg.parallel, self.cfg.data
        return {"tp": p.tp, "pp": p.pp, "pp_schedule": p.pp_schedule if p.pp > 1 else "-",
                "pp_virtual": p.pp_virtual, "dp_shard": p.dp_shard, "dp_replicate": p.dp_replicate, "ep": p.ep,
                "activation_checkpointing": self.cfg.train.activation_checkpointing,
                "micro_batch_size": d.micro_batch_size, "memory_gib_per_rank": self.memory.total / 2**30,
                "fits": self.fits, "step_s": self.time.seconds, "tokens_per_s": self.time.tokens_per_s,
                "mfu": self.time.mfu, "bubble": self.time.bubble, "comm_share": self.time.comm_share,
                "overrides": self.overrides}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(cfg: RunConfig, cluster: Cluster, micro_batches: list[int] | None = None,
            refused: Counter | None = None):
    """Every layout of ``cfg`` on ``cluster`` the trainer would accept (check_layout); ``refused`` counts the
    trainer's reasons for the others."""
    m, d = cfg.model, cfg.data
    world, g = cluster.world, cluster.gpus_per_node
    mbs = micro_batches or [b for b in (1, 2, 4, 8, 16) if b <= d.global_batch_size]
    for tp in [t for t in _divisors(g) if t <= 8]:
        for pp in [k for k in _divisors(world // tp) if k <= m.num_layers]:
            dp = world // (tp * pp)
            shards = sorted({dp, *([dp // (cluster.nodes // pp)] if pp <= cluster.nodes and
                                   cluster.nodes % pp == 0 and dp % (cluster.nodes // pp) == 0 else []), 1})
            for dp_shard in shards:
                dp_replicate = dp // dp_shard
                eps = [e for e in _divisors(dp_shard) if m.moe.num_experts and m.moe.num_experts % e == 0] or [1]
                for ep, (schedule, virtual), ac, mb in itertools.product(
                        eps, SCHEDULES if pp > 1 else [("1f1b", 1)], CHECKPOINTING, mbs):
                    if d.global_batch_size % (mb * dp):
                        continue
                    try:
                        candidate = cfg.replace(
                            parallel={"tp": tp, "pp": pp, "dp_shard": dp_shard, "dp_replicate": dp_replicate,
                                      "ep": ep, "pp_schedule": schedule, "pp_virtual": virtual, "pp_layout": [],
                                      "engine": "native"},
                            train={"activation_checkpointing": ac}, data={"micro_batch_size": mb})
                        check_layout(candidate)
                    except ConfigError as e:
                        if refused is not None:
                            refused[str(e)] += 1
                        continue
                    yield candidate


def why_no_layout(cfg: RunConfig, cluster: Cluster, refused: Counter, micro_batches: list[int] | None = None) -> str:
    """Why the trainer accepts no layout of ``cfg`` on ``cluster`` (``refused``: what `rank` counted), and the
    nearest global batch size and number of nodes that it would accept one of."""
    reason = refused.most_common(1)[0][0] if refused else (
        f"data.global_batch_size={cfg.data.global_batch_size} cannot be split into whole micro-batches over the "
        "data-parallel ranks of any layout")

    def possible(c: RunConfig, cl: Cluster) -> bool:
        return next(layouts(c, cl, micro_batches), None) is not None

    fixes = []
    for k in range(1, 13):
        try:
            bigger = cfg.replace(data={"global_batch_size": cfg.data.global_batch_size * 2**k})
        except ConfigError:
            continue
        if possible(bigger, cluster):
            fixes.append(f"data.global_batch_size={bigger.data.global_batch_size}")
            break
    smaller = [(n, cluster.gpus_per_node) for n in range(cluster.nodes - 1, 0, -1)] + [
        (1, g) for g in range(cluster.gpus_per_node - 1, 0, -1) if cluster.nodes == 1]
    for nodes, gpus in smaller:
        if possible(cfg, dataclasses.replace(cluster, nodes=nodes, gpus_per_node=gpus)):
            fixes.append(f"--nodes {nodes}" if gpus == cluster.gpus_per_node else f"--gpus-per-node {gpus}")
            break
    fix = f" It would be possible with {' or '.join(fixes)}." if fixes else ""
    return (f"the trainer accepts no layout of this run on {cluster.world} processes ({sum(refused.values())} "
            f"refused; the most common reason: {reason.rstrip('.')}).{fix}")


def evaluate(cfg: RunConfig, cluster: Cluster) -> Candidate:
    mem = estimate(cfg, "cuda" if cluster.device.runtime_bytes else "cpu")
    fits = mem.total + cluster.device.runtime_bytes <= cluster.device.memory_bytes
    return Candidate(cfg, mem, step_time(cfg, cluster), fits)


def rank(cfg: RunConfig, cluster: Cluster, micro_batches: list[int] | None = None, progress=None,
         refused: Counter | None = None) -> list[Candidate]:
    """Candidates that fit, fastest first (equal to 3 significant digits: the smaller memory first), then those
    that do not, smallest first. ``progress(n)`` is called every few seconds with the layouts evaluated so far;
    ``refused`` counts the layouts the trainer would refuse, by reason."""
    import time

    out, last = [], time.monotonic()
    for c in layouts(cfg, cluster, micro_batches, refused):
        out.append(evaluate(c, cluster))
        if progress and time.monotonic() - last > 5:
            progress(len(out))
            last = time.monotonic()
    fit = sorted((c for c in out if c.fits), key=lambda c: (-float(f"{c.time.tokens_per_s:.3g}"), c.memory.total))
    unfit = sorted((c for c in out if not c.fits), key=lambda c: c.memory.total)
    return fit + unfit
