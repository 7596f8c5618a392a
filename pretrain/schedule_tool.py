"""`pretrain schedule`: a pipeline schedule's per-rank timeline (F, I, W, B and idle), its bubble fraction and the
activations each rank holds at its peak, from assumed or measured action costs (docs/parallelism.md, pipeline parallelism).

The orders are the ones the trainer runs (``parallel/schedules.py``); the timeline replays them with the given
durations and free communication. Costs are assumed (``--costs F,I,W``, default 1,1,1 as in the zero-bubble
paper; a full backward B takes I + W) or measured: ``--from-run RUN_DIR`` takes the mean F, I, W (and B)
milliseconds a pipeline run logged (``pp/f_ms`` ... in metrics.jsonl).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pretrain.errors import UserError
from pretrain.parallel import schedules
from pretrain.paths import require_writable_file

COLORS = {"F": "#4C78A8", "B": "#E45756", "I": "#F58518", "W": "#54A24B"}
MAX_STAGE_MICROBATCHES = 1 << 20  # the replay keeps every action in memory: about 1.5 GiB and a minute at this size


def measured_costs(run_dir: Path) -> dict[str, float]:
    """F, I, W milliseconds from the newest record of a pipeline run that has them (I and W from B when the
    run had no split backward: the usual estimate, each half of B)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; --from-run takes the run directory of a training run with parallel.pp > 1.")
    timed = [c for c in map(_costs, path.read_text(errors="replace").splitlines()) if c]
    if not timed:
        raise UserError(f"'{path}' has no pipeline timings (pp/f_ms); they are logged by runs with parallel.pp > 1 "
                        "from their second step on.")
    return timed[-1]


def _costs(line: str) -> dict[str, float] | None:
    """F, I, W of one metrics.jsonl line; None for a line without them (or cut short by a killed run, or with a
    non-finite time, logged as null)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or "pp/f_ms" not in rec:
        return None
    if "pp/i_ms" in rec and "pp/w_ms" in rec:
        costs = {"F": rec["pp/f_ms"], "I": rec["pp/i_ms"], "W": rec["pp/w_ms"]}
    else:  # no split backward: I and W each half of B
        half = rec["pp/b_ms"] / 2 if isinstance(rec.get("pp/b_ms"), (int, float)) else None
        costs = {"F": rec["pp/f_ms"], "I": half, "W": half}
    ok = all(isinstance(v, (int, float)) and 0 < v < math.inf for v in costs.values())
    return costs if ok else None


def parse_costs(text: str) -> dict[str, float]:
    try:
        f, i, w = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--costs {text!r}: give three durations F,I,W such as 1,1,1 or 1,1.2,0.8.") from None
    if not all(1e-6 <= x <= 1e6 for x in (f, i, w)):  # (NaN fails too; 1e308 would overflow the timeline's sums)
        raise UserError(f"--costs {text!r}: durations must lie between 1e-6 and 1e6, such as 1,1,1 or 1,1.2,0.8 (any "
                        "unit: the bubble depends only on their ratios).")
    return {"F": f, "I": i, "W": w}


def _check_virtual(schedule: str, virtual: int) -> None:
    """--virtual as the schedule takes it (named here as an option, not as parallel.pp_virtual)."""
    if schedule in schedules.ONE_STAGE_PER_RANK and virtual != 1:
        raise UserError(f"--virtual {virtual}: {schedule} runs one stage per rank; give 1, or leave --virtual out.")
    if schedule in schedules.V_SHAPED and virtual != 2:
        raise UserError(f"--virtual {virtual}: {schedule} runs two stages per rank in a V; give 2, or leave --virtual "
                        "out.")
    if virtual < 1:
        raise UserError(f"--virtual {virtual}: give the stages per rank, 1 or more (default 2 for {schedule}).")


def build_timeline(schedule: str, pp: int, microbatches: int, virtual: int,
                   cost: dict[str, float]) -> schedules.Timeline:
    problem = schedules.check_schedule(schedule, pp, microbatches, virtual)
    if problem:
        raise UserError(f"{problem}; change --microbatches or --virtual.")
    order = schedules.compute_order(schedule, pp, microbatches, virtual)
    return schedules.simulate(order, pp * schedules.stages_per_rank(schedule, virtual), cost)


def draw(timeline: schedules.Timeline, title: str, out: Path, show_stage: bool = False) -> None:
    """One row per rank, one box per action labelled with its microbatch (stage:microbatch with several
    stages per rank); gaps are idle time."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("drawing needs matplotlib: pip install -e '.[dev]' (or pip install matplotlib).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted({i.rank for i in timeline.intervals})
    fig, ax = plt.subplots(figsize=(max(8.0, 0.35 * len(timeline.intervals) / len(ranks)), 0.6 * len(ranks) + 1.6))
    for i in timeline.intervals:
        ax.broken_barh([(i.start, i.end - i.start)], (i.rank - 0.4, 0.8), facecolors=COLORS[i.kind],
                       edgecolors="white", linewidth=0.5)
        ax.text((i.start + i.end) / 2, i.rank, f"{i.stage}:{i.microbatch}" if show_stage else f"{i.microbatch}",
                ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, timeline.makespan)
    ax.set_xlabel("time")
    ax.set_title(title, fontsize=10)
    kinds = sorted({i.kind for i in timeline.intervals}, key="FBIW".index)
    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in kinds] + [Patch(facecolor="white", edgecolor="grey", label="idle")],
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(ranks) < 3 else -0.18), ncol=5, frameon=False)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)


def _check_image_path(out: Path) -> None:
    """The format from the suffix, and a writable place, checked before anything is computed."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix.lower().lstrip(".") not in formats:
        raise UserError(f"--out '{out}': matplotlib cannot write '{out.suffix or 'no suffix'}' images; use one of "
                        f"{', '.join('.' + f for f in sorted(formats))} (e.g. .png).")
    require_writable_file(out, "--out")


def run_schedule_tool(schedule: str, pp: int, microbatches: int, virtual: int | None, costs: str | None,
                      from_run: str | None, out: str | None, log=print) -> schedules.Timeline:
    if pp < 2:
        raise UserError(f"--pp {pp}: a pipeline has at least 2 ranks.")
    if out:
        _check_image_path(Path(out))
    if virtual is None:
        virtual = 2 if schedule not in schedules.ONE_STAGE_PER_RANK else 1
    _check_virtual(schedule, virtual)
    if microbatches < 1:
        raise UserError(f"--microbatches {microbatches}: give the microbatches per step, 1 or more (default 8).")
    stages = schedules.stages_per_rank(schedule, virtual)
    if pp * stages * microbatches > MAX_STAGE_MICROBATCHES:
        raise UserError(f"--pp {pp} x {stages} stage(s) per rank x --microbatches {microbatches} make "
                        f"{pp * stages * microbatches:,} stage-microbatches, more than the {MAX_STAGE_MICROBATCHES:,} "
                        "the timeline replays; give fewer ranks or microbatches.")
    cost = measured_costs(Path(from_run)) if from_run else parse_costs(costs or "1,1,1")
    timeline = build_timeline(schedule, pp, microbatches, virtual, cost)
    costs_text = ", ".join(f"{k} {v:.3g}" for k, v in cost.items())
    log(f"{schedule}: pp {pp}, {stages} stage(s) per rank, {microbatches} microbatches, costs {costs_text}")
    log(f"  bubble fraction   {timeline.bubble_fraction:.3f}  (idle share of {pp} ranks x {timeline.makespan:.4g})")
    peaks = timeline.peak_activations
    log("  peak activations  " + ", ".join(f"rank {r}: {peaks[r]}" for r in sorted(peaks))
        + "  (stage-microbatch activations held at once)")
    if out:
        title = (f"{schedule}  pp={pp} x {stages} stage(s)/rank, {microbatches} microbatches  |  bubble "
                 f"{timeline.bubble_fraction:.1%}, peak activations {max(peaks.values())}")
        draw(timeline, title, Path(out), show_stage=stages > 1)
        log(f"  timeline -> {out}")
    return timeline
