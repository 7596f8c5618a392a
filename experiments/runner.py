"""What every experiment script shares: runs of `pretrain train` as subprocesses (skipped when already finished, so
an interrupted experiment resumes), their metrics, and the output folder with the JSON and the plots.

Each `pretrain` command runs in the experiment's own process, one after the other: that saves an interpreter
start-up (about 5 s) per run and gives the same numbers bit for bit (each run seeds everything it draws). With
``PRETRAIN_EXPERIMENTS_IN_PROCESS=0`` each runs in a process of its own instead, its output kept quiet; wall times
then include that start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(run_dir: Path, overrides: list[str], config: str = "configs/quickstart.yaml", log=print,
          in_process: bool | None = None) -> list[dict]:
    """Train ``config`` with ``overrides`` into ``run_dir`` unless a finished run is there; returns its metrics."""
    run_pretrain(run_dir, ["train", config, *overrides, f"train.run_dir={run_dir}", "logging.tensorboard=false"], log,
                 in_process)
    return metrics(run_dir)


def run_pretrain(run_dir: Path, argv: list[str], log=print, in_process: bool | None = None) -> float:
    """`pretrain ARGV` for the run in ``run_dir`` unless it finished before (RUN_DIR/done.json); its wall seconds.
    ``in_process=False``: in a process of its own whatever the environment says (a run whose wall time is compared
    with one that starts processes)."""
    done = run_dir / "done.json"
    if in_process is None:
        in_process = os.environ.get("PRETRAIN_EXPERIMENTS_IN_PROCESS", "1") != "0"
    if not done.is_file():
        t0 = time.perf_counter()
        log(f"  {argv[0]} {run_dir.name} ...")
        if in_process:
            import contextlib

            from pretrain.cli import main

            with contextlib.chdir(REPO):  # (the commands name files relative to the repository)
                code = main(list(argv))
            if code != 0:
                raise RuntimeError(f"run {run_dir} failed with exit code {code} (its messages are above)")
        else:
            result = subprocess.run([sys.executable, "-m", "pretrain", *argv], cwd=REPO, capture_output=True,
                                    text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if result.returncode != 0:
                raise RuntimeError(f"run {run_dir} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}")
        run_dir.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
        log(f"  {run_dir.name}: {time.perf_counter() - t0:.0f} s")
    return wall_seconds(run_dir)


def wall_seconds(run_dir: Path) -> float:
    """How long the finished run in ``run_dir`` took (its `pretrain` command, start-up included)."""
    return json.loads((run_dir / "done.json").read_text())["seconds"]


def plot_curves(path: Path, seeds: list[dict], arms: list[tuple[str, str, str]], title: str, xlabel: str,
                hline: float | None = None, marks: list[tuple[float, str]] = ()) -> None:
    """Validation loss against FLOPs: for each seed's result and each arm (key of its curve, color, label), one line
    (labelled once); a dotted level ``hline`` and vertical ``marks`` (x, label) if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, seed in enumerate(seeds):
        for key, color, label in arms:
            curve = seed[key]
            ax.plot([c[0] for c in curve], [c[1] for c in curve], color=color, alpha=0.8, linewidth=1.2,
                    label=label if i == 0 else None)
    if hline is not None:
        ax.axhline(hline, color=arms[0][1], linestyle=":", linewidth=0.8)
    for i, (x, label) in enumerate(marks):
        ax.axvline(x, color="gray", linestyle=":", linewidth=0.8, label=label if i == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_name() -> str:
    """The GPU the runs trained on, or the CPU model (the figures depend on it)."""
    import torch

    from pretrain.device import cpu_info
    from pretrain.device import device_name as name

    return name(torch.device("cuda")) if torch.cuda.is_available() else f"{cpu_info()}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def validation(records: list[dict]) -> list[tuple[float, float, int]]:
    """(FLOPs, validation loss, tokens) of every validation of a run, in order."""
    return [(r["flops"], r["val_loss"], r["tokens"]) for r in records if "val_loss" in r]


def first_reaching(curve: list[tuple[float, float, int]], target: float) -> tuple[float, float] | None:
    """(FLOPs, tokens) at which ``curve`` first reaches ``target``, linearly between two validations; None if never."""
    for (f0, l0, t0), (f1, l1, t1) in zip(curve, curve[1:], strict=False):
        if l1 <= target:
            w = 1.0 if l0 <= target else (l0 - target) / (l0 - l1)
            return f0 + w * (f1 - f0), t0 + w * (t1 - t0)
    return (curve[0][0], curve[0][2]) if curve and curve[0][1] <= target else None


def write(out: Path, name: str, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def seed_summary(results: dict) -> dict:
    """{variant: {mean, min, max}} of the final validation loss over the seeds of ``results[variant][seed]``."""
    import statistics

    return {name: {"mean": statistics.mean(v["final_val_loss"] for v in seeds.values()),
                   "min": min(v["final_val_loss"] for v in seeds.values()),
                   "max": max(v["final_val_loss"] for v in seeds.values())} for name, seeds in results.items()}


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def output_dir(given: str | None, name: str, scale: str) -> Path:
    """--out, or experiments/out/NAME (NAME_gpu for --scale gpu), relative to the repository."""
    out = Path(given or f"experiments/out/{name}{'_gpu' if scale == 'gpu' else ''}")
    return out if out.is_absolute() else REPO / out
