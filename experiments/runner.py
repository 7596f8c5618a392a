"""What every experiment script shares: runs of `pretrain train` as subprocesses (skipped when already finished, so
an interrupted experiment resumes), their metrics, and the output folder with the JSON and the plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(run_dir: Path, overrides: list[str], config: str = "configs/quickstart.yaml", log=print) -> list[dict]:
    """Train ``config`` with ``overrides`` into ``run_dir`` unless a finished run is there; returns its metrics."""
    done = run_dir / "done.json"
    if not done.is_file():
        t0 = time.perf_counter()
        log(f"  training {run_dir.name} ...")
        result = subprocess.run([sys.executable, "-m", "pretrain", "train", config, *overrides,
                                 f"train.run_dir={run_dir}", "logging.tensorboard=false"], cwd=REPO,
                                capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if result.returncode != 0:
            raise RuntimeError(f"run {run_dir} failed:\n{result.stderr[-4000:]}")
        done.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
        log(f"  {run_dir.name}: {time.perf_counter() - t0:.0f} s")
    return metrics(run_dir)


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
