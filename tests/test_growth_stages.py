"""A run that grows while it trains (``growth:``): it grows at its step into the stage's model and layout (here from
two data-parallel shards to two pipeline stages), continues the data without repeating or skipping a sample, keeps
the small model's last checkpoint as a record, and a run killed right after growing, or stopped before it, resumes
with the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
from pretrain.config import ConfigError, load_config
from pretrain.growth.operators import depth_map
from tests.conftest import REPO, TINY, launch_jobs

STEPS = ["train.max_steps=8", "train.eval_interval=4", "checkpoint.interval=4", "train.log_interval=1",
         "optim.warmup_steps=1"]
GROW = "growth=[{at_step: 3, op: stack, factor: 2}]"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trace(run_dir: Path) -> dict[int, tuple]:
    return {r["step"]: (r["consumed_samples"], r["loss"]) for r in records(run_dir) if "loss" in r}


def check_grown(run_dir: Path) -> None:
    """The small model's last checkpoint is kept as the stage's record, and the data went on: every step once, each
    reading the next global batch."""
    record = json.loads((run_dir / "growth" / "stage0" / "step_0000003" / "trainer_state.json").read_text())
    assert record["step"] == 3 and "stage" not in record
    grown_cfg = load_config(run_dir / "config.yaml")
    assert grown_cfg.growth[0].at_step == 3  # the run's config keeps its stages
    lines = records(run_dir)
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 9))
    gbs = grown_cfg.data.global_batch_size
    assert [r["consumed_samples"] for r in lines if "loss" in r] == [gbs * s for s in range(1, 9)]
    assert all(r["loss"] == r["loss"] for r in lines if "loss" in r)


@pytest.fixture(scope="module")
def grown_runs(tmp_path_factory, shared_cache):
    """A dense and an LNS run on 2 processes (one launch), each growing from 2 data-parallel shards of 2 blocks
    to 2 pipeline stages of 2 blocks each after step 3."""
    tmp = tmp_path_factory.mktemp("grown_runs")
    base = TINY + [f"tokenizer.path={shared_cache}/tok.model", f"data.prefix={shared_cache}/corpus", *STEPS]
    grow = "growth=[{at_step: 3, op: stack, factor: 2, parallel: {dp_shard: 1, pp: 2}}]"
    jobs = [{"overrides": base + extra + ["parallel.dp_shard=2", grow, f"train.run_dir={tmp}/{kind}"]}
            for kind, extra in {"dense": [], "lns": ["model.norm_scaling=lns"]}.items()]
    launch_jobs("dist_worker.py", 2, jobs, tmp, port=29650)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "lns"])
def test_grows_mid_run_into_another_layout(grown_runs, kind):
    run_dir = grown_runs / kind
    check_grown(run_dir)
    small = pretrain.load_model(run_dir / "growth" / "stage0" / "step_0000003").state_dict()
    grown = pretrain.load_model(run_dir / "checkpoints" / "step_0000003").state_dict()  # the grown stage's first
    order = depth_map("stack", 2, 4)
    for name, tensor in grown.items():
        parts = name.split(".", 2)
        key = f"blocks.{order[int(parts[1])]}.{parts[2]}" if parts[0] == "blocks" else name
        assert torch.equal(tensor, small[key]), name
    step4 = json.loads((run_dir / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert step4["stage"] == 1 and step4["growth"][0]["op"] == "stack"
    grown = load_config(run_dir / "checkpoints" / "step_0000004" / "config.yaml")
    assert grown.model.num_layers == 4 and grown.parallel.pp == 2 and not grown.growth


def growth_args(shared_cache: Path) -> list[str]:
    return ["train", "configs/quickstart.yaml", *TINY, f"tokenizer.path={shared_cache}/tok.model",
            f"data.prefix={shared_cache}/corpus", *STEPS, GROW, "checkpoint.interval=2"]


@pytest.fixture(scope="module")
def whole_growth_run(tmp_path_factory, shared_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("whole_growth") / "run"
    whole = subprocess.run([sys.executable, "-m", "pretrain", *growth_args(shared_cache), f"train.run_dir={run_dir}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("interruption", ["killed after growing", "stopped before growing"])
def test_interrupted_growth_run_resumes_exactly(shared_cache, whole_growth_run, tmp_path, interruption):
    run = [sys.executable, "-m", "pretrain", *growth_args(shared_cache), f"train.run_dir={tmp_path}/run"]
    if interruption == "killed after growing":
        first = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PRETRAIN_FAULT": "growth.after"})
        assert first.returncode == -9, first.stderr[-3000:]
    else:
        first = subprocess.run([*run, "train.stop_at_step=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert trace(tmp_path / "run") == trace(whole_growth_run)
    check_grown(tmp_path / "run")


def test_growth_stages_are_checked_at_load(tiny_cfg):
    with pytest.raises(ConfigError, match="growth\\[1\\].at_step"):
        tiny_cfg("growth=[{at_step: 5}, {at_step: 4}]")
    with pytest.raises(ConfigError, match="growth\\[0\\].parallel"):
        tiny_cfg("growth=[{at_step: 5, parallel: {pipeline: 2}}]")
    with pytest.raises(ConfigError, match="growth\\[0\\].experts"):
        tiny_cfg("growth=[{at_step: 5, op: upcycle}]")


@pytest.mark.slow
def test_zero_growth_in_place_equals_the_operator(tiny_overrides, tmp_path):
    """Growth in place (each rank reads its shards) gives what the operator computes in memory, scaled LNS norms and
    zeroed output projections included."""
    from pretrain.growth.operators import grow_depth
    from pretrain.train.trainer import run_training

    lines = []
    cfg = load_config(None, [*tiny_overrides, *STEPS, "model.norm_scaling=lns", "train.max_steps=4",
                             "growth=[{at_step: 3, op: zero, factor: 2}]"])
    run_training(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("by zero (every rank read its shards" in line for line in lines)
    small = pretrain.load_model(tmp_path / "run" / "growth" / "stage0" / "step_0000003")
    expected = grow_depth(small.state_dict(), small.cfg, "zero", factor=2, seed=cfg.train.seed)
    grown = pretrain.load_model(tmp_path / "run" / "checkpoints" / "step_0000003").state_dict()
    assert set(grown) == set(expected.state)
    for name, tensor in grown.items():
        assert torch.equal(tensor, expected.state[name]), name
    assert any(v not in (None,) and v[1] != 1.0 for v in expected.origin.values())  # some norms were rescaled
