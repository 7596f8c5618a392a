"""Pipeline schedules as per-rank action lists, and a timeline simulator (docs/parallelism.md, pipeline parallelism).

A schedule is what torch's pipeline schedule runtime executes: for every pipeline rank, the ordered
compute actions on (stage, microbatch): F forward, B full backward, I input backward (the gradient the
previous stage waits for), W weight backward, and DualPipe-V's OVERLAP_F_B pairs. torch's schedule classes
give the orders of ``gpipe``, ``interleaved_1f1b``, ``zero_bubble`` (interleaved ZB-H1), ``zbv`` and
``dualpipev``. Built here: ``1f1b`` (torch's order for drawing starts the last rank at microbatch 1) and the
two-stage-backprop orders of Rae et al. 2024 ("2BP: 2-Stage Backpropagation"):

  gpipe_2bp   every F, then every I, then every W
  1f1b_2bp    1F1B with each B replaced by I; one W after each cool-down I, the remaining Ws at the end

The trainer and ``pretrain schedule`` use the same orders, so the drawn timeline is the one that runs.
``simulate`` replays an order with given F/I/W durations (B = I + W, no communication time) and reports
the bubble fraction and the activations each rank holds at its peak.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

from torch.distributed.pipelining import (
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    PipelineScheduleSingle,
)

from pretrain.torch_compat import Action, validate_schedule

TORCH_SCHEDULES = {"gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B,
                   "zero_bubble": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble,
                   "dualpipev": ScheduleDualPipeV}
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev", "gpipe_2bp", "1f1b_2bp")
ONE_STAGE_PER_RANK = {"gpipe", "1f1b", "gpipe_2bp", "1f1b_2bp"}
V_SHAPED = {"zbv", "dualpipev"}  # two stages per rank: r and 2 pp - 1 - r
SPLIT_BACKWARD = {"zero_bubble", "zbv", "dualpipev", "gpipe_2bp", "1f1b_2bp"}  # schedules with I and W actions

Order = dict[int, list[Action]]


def stages_per_rank(name: str, virtual: int) -> int:
    return 1 if name in ONE_STAGE_PER_RANK else virtual


def stage_ranks(name: str, pp: int, virtual: int) -> dict[int, int]:
    """Stage index -> pipeline rank: looped (stage s on rank s mod pp) or V-shaped."""
    num_stages = pp * stages_per_rank(name, virtual)
    if name in V_SHAPED:
        return {s: s if s < pp else 2 * pp - 1 - s for s in range(num_stages)}
    return {s: s % pp for s in range(num_stages)}


def compute_order(name: str, pp: int, microbatches: int, virtual: int = 1) -> Order:
    """The compute actions of every pipeline rank, in execution order."""
    if name == "gpipe_2bp":
        kinds = (FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)
        return {r: [Action(r, kind, m) for kind in kinds for m in range(microbatches)] for r in range(pp)}
    if name in ("1f1b", "1f1b_2bp"):
        if microbatches < pp:
            raise ValueError(f"1F1B needs at least as many microbatches as stages ({pp})")
        return {r: _one_f_one_b(r, pp, microbatches, split=name == "1f1b_2bp") for r in range(pp)}
    # The schedule classes compute every rank's order at construction, then add the communication the runtime
    # needs (slow for many microbatches, and not needed here).
    cls = type(f"_Order{TORCH_SCHEDULES[name].__name__}", (TORCH_SCHEDULES[name],),
               {"_prepare_schedule_with_comms": lambda self, *args, **kwargs: None})
    n_local = stages_per_rank(name, virtual)
    # They read only these stage fields.
    stages = [SimpleNamespace(num_stages=pp * n_local, group_size=pp, group_rank=0, submod=None, stage_index=i)
              for i in range(n_local)]
    if issubclass(cls, PipelineScheduleSingle):
        order = cls(stages[0], microbatches).pipeline_order
    else:
        order = cls(stages, microbatches).pipeline_order
    return {r: [a for a in order[r] if a is not None and a.is_compute_op] for r in range(pp)}


def _one_f_one_b(rank: int, pp: int, microbatches: int, split: bool) -> list[Action]:
    """Warm-up forwards, then one F and one backward in turn, then the cool-down backwards. With ``split``
    each backward is an I, each cool-down I is followed by the oldest pending W, the rest come last."""
    backward = BACKWARD_INPUT if split else FULL_BACKWARD
    warmup = min(pp - 1 - rank, microbatches)
    actions = [Action(rank, FORWARD, m) for m in range(warmup)]
    pending: deque[int] = deque()
    for m in range(microbatches - warmup):
        actions += [Action(rank, FORWARD, warmup + m), Action(rank, backward, m)]
        pending.append(m)
    for m in range(microbatches - warmup, microbatches):
        actions.append(Action(rank, backward, m))
        pending.append(m)
        if split:
            actions.append(Action(rank, BACKWARD_WEIGHT, pending.popleft()))
    return actions + ([Action(rank, BACKWARD_WEIGHT, m) for m in pending] if split else [])


@functools.lru_cache(maxsize=1024)
def cached_order(name: str, pp: int, microbatches: int, virtual: int = 1) -> Order:
    """``compute_order``, computed once per arguments (torch builds some orders slowly): read it, never change it."""
    return compute_order(name, pp, microbatches, virtual)


@functools.lru_cache(maxsize=4096)
def check_schedule(name: str, pp: int, microbatches: int, virtual: int) -> str | None:
    """Why ``name`` cannot run pp ranks x virtual stages on this many microbatches, or None."""
    if name in ONE_STAGE_PER_RANK and virtual != 1:
        return f"{name} runs one stage per rank, but parallel.pp_virtual is {virtual} (set it to 1)"
    if name in V_SHAPED and virtual != 2:
        return f"{name} runs exactly two stages per rank in a V, but parallel.pp_virtual is {virtual} (set it to 2)"
    try:
        order = cached_order(name, pp, microbatches, virtual)
        validate_schedule(order, pp, pp * stages_per_rank(name, virtual), microbatches)
    except (ValueError, AssertionError, KeyError) as e:
        return f"{name} cannot run {microbatches} microbatches on {pp} ranks ({str(e).splitlines()[0]})"
    return None


@dataclass
class Interval:
    rank: int
    stage: int
    kind: str  # F, B, I or W
    microbatch: int
    start: float
    end: float


@dataclass
class Timeline:
    intervals: list[Interval]
    makespan: float
    bubble_fraction: float  # idle share of pp x makespan
    peak_activations: dict[int, int]  # per rank: stage-microbatch activations held at the peak


def simulate(order: Order, num_stages: int, cost: dict[str, float]) -> Timeline:
    """Replay ``order`` with durations ``cost`` = {"F": tf, "I": ti, "W": tw} per stage-microbatch (B takes
    ti + tw) and free communication. An action starts when its rank is free and its inputs exist: F(s, m)
    after F(s-1, m); I or B(s, m) after F(s, m) and I or B(s+1, m); W(s, m) after I(s, m).

    Memory counts one unit per stage-microbatch from the start of its F until its B or W ends: in split
    schedules the activations and output gradients stay alive until the weight gradient is computed."""
    durations = {"F": cost["F"], "I": cost["I"], "W": cost["W"], "B": cost["I"] + cost["W"]}
    done: dict[tuple[str, int, int], float] = {}  # ("F" | "I" | "W", stage, mb) -> end time
    free = dict.fromkeys(order, 0.0)
    position = dict.fromkeys(order, 0)
    intervals: list[Interval] = []

    def ready_at(a: Action) -> float | None:
        s, m, kind = a.stage_index, a.microbatch_index, a.computation_type.value
        needs = {"F": [("F", s - 1, m)] if s > 0 else [],
                 "I": [("F", s, m)] + ([("I", s + 1, m)] if s < num_stages - 1 else []),
                 "W": [("I", s, m)]}
        needs["B"] = needs["I"]
        times = [done.get(key) for key in needs[kind]]
        return None if None in times else max(times, default=0.0)

    remaining = sum(len(actions) for actions in order.values())
    while remaining:
        progress = False
        for rank, actions in order.items():
            while position[rank] < len(actions):
                action = actions[position[rank]]
                parts = action.sub_actions if action.computation_type == OVERLAP_F_B else (action,)
                starts = [ready_at(a) for a in parts]
                if None in starts:
                    break
                t = max([free[rank], *starts])
                for a in parts:
                    kind = a.computation_type.value
                    end = t + durations[kind]
                    intervals.append(Interval(rank, a.stage_index, kind, a.microbatch_index, t, end))
                    for key in {"F": ["F"], "I": ["I"], "W": ["W"], "B": ["I", "W"]}[kind]:
                        done[(key, a.stage_index, a.microbatch_index)] = end
                    t = end
                free[rank] = t
                position[rank] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = {r: str(order[r][position[r]]) for r in order if position[r] < len(order[r])}
            raise ValueError(f"the schedule deadlocks: every rank waits ({stuck})")
    makespan = max(i.end for i in intervals)
    busy = sum(i.end - i.start for i in intervals)
    return Timeline(intervals, makespan, 1.0 - busy / (len(order) * makespan), _peak_activations(intervals))


def _peak_activations(intervals: list[Interval]) -> dict[int, int]:
    peaks: dict[int, int] = {}
    for rank in {i.rank for i in intervals}:
        events = []
        for i in intervals:
            if i.rank == rank and i.kind == "F":
                events.append((i.start, 1))
            elif i.rank == rank and i.kind in ("B", "W"):
                events.append((i.end, -1))
        held = peak = 0
        for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # frees before allocations at a tie
            held += delta
            peak = max(peak, held)
        peaks[rank] = peak
    return peaks
