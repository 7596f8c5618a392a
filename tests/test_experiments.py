"""Each experiment script runs end to end at a toy size (seconds), so that none of them rots: runs, JSON, plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

ENV = {**os.environ, "PRETRAIN_EXPERIMENTS_IN_PROCESS": "1"}  # one process per script, not per run (runner.py)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One output folder for every toy experiment: they share its tokenizer and token files (out/cache)."""
    return tmp_path_factory.mktemp("experiments")


def test_growth_stack_experiment_runs_at_toy_size(out):
    tmp_path = out
    result = subprocess.run([sys.executable, "experiments/growth_stack.py", "--scale", "toy", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "growth_stack.json").read_text())
    seed = data["seeds"]["1"]
    assert seed["scratch_curve"] and seed["stacked_curve"] and (tmp_path / "growth_stack.png").stat().st_size > 0
    # equal compute: the stacked run's last validation spent the scratch run's budget (to one step)
    assert abs(seed["stacked_curve"][-1][0] - data["budget_flops"]) <= data["target_flops_per_token"] * 512
    assert "seed 1:" in result.stdout


def test_assembly_experiment_runs_at_toy_size(out):
    tmp_path = out
    result = subprocess.run([sys.executable, "experiments/assembly.py", "--scale", "toy", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "assembly.json").read_text())
    seed = data["seeds"]["1"]
    assert seed["end_to_end_curve"] and seed["assembled_curve"] and (tmp_path / "assembly.png").stat().st_size > 0
    # equal compute: the join's last validation has spent, with the meta model and the incubations, the end-to-end
    # run's budget (to one step of the target)
    assert abs(seed["assembled_flops"] - data["budget_flops"]) <= data["flops_per_token"]["target"] * 512
    assert abs(seed["end_to_end_flops"] - data["budget_flops"]) <= 1e-6 * data["budget_flops"]
    assert set(seed["phase_wall_s"]) == {"meta", "module 1", "module 2", "join"}
    assert "seed 1:" in result.stdout


def test_norms_experiment_runs_at_toy_size(out):
    result = subprocess.run([sys.executable, "experiments/norms.py", "--scale", "toy", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "norms.json").read_text())
    assert set(data["variants"]) == {"pre_ln", "post_ln", "lns"}
    for seeds in data["variants"].values():
        r = seeds["1"]
        assert r["curve"] and len(r["grad_norm"]) == len(r["angular_distance"]) == len(r["loss_without_block"]) == 4
        # removing a block changes the function: the held-out loss moves for every block
        assert all(abs(x - r["held_out_loss"]) > 0 for x in r["loss_without_block"])
    assert (out / "norms.png").stat().st_size > 0 and "pre_ln" in result.stdout


def test_moe_experiment_runs_at_toy_size(out):
    result = subprocess.run([sys.executable, "experiments/moe.py", "--scale", "toy", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "moe.json").read_text())
    assert set(data["variants"]) == {"dense", "top2", "hash"}
    assert data["variants"]["dense"]["1"]["load_cv"] == []  # no experts, no load
    for name in ("top2", "hash"):
        cv = data["variants"][name]["1"]["load_cv"]
        assert cv and all(value >= 0 for _, value in cv)
    # equal active parameters: the MoE variants spend (nearly) the dense model's FLOPs per step
    flops = {name: seeds["1"]["curve"][-1][0] for name, seeds in data["variants"].items()}
    assert abs(flops["top2"] / flops["dense"] - 1) < 0.05 and abs(flops["hash"] / flops["dense"] - 1) < 0.05
    assert (out / "moe.png").stat().st_size > 0 and "dense" in result.stdout


def test_structured_experiment_runs_at_toy_size(out):
    result = subprocess.run([sys.executable, "experiments/structured.py", "--scale", "toy", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "structured.json").read_text())
    summary = data["final_val_loss"]
    assert set(summary) == {"dense", "lowrank_32", "blockshuffle_32", "lowrank_32_sgt_same_flops"}
    assert summary["dense"]["ffn_param_share"] == 1.0
    assert all(0.25 < summary[name]["ffn_param_share"] < 0.4 for name in summary if name != "dense")
    # equal compute: every variant ends within one step's FLOPs of the dense run's budget, the guide counted
    flops = {name: seeds["1"]["flops"] for name, seeds in data["variants"].items()}
    steps = {name: seeds["1"]["steps"] for name, seeds in data["variants"].items()}
    assert all(abs(flops[n] / flops["dense"] - 1) < 1.5 / steps[n] + 0.02 for n in flops), flops
    assert steps["lowrank_32"] > steps["dense"]  # the cheaper FFN trains longer on the same budget
    assert (out / "structured.png").stat().st_size > 0


def test_pipeline_benchmark_runs_at_toy_size(tmp_path):
    """The 2BP row of docs/results.md: a measured pp=2 launch and the pp 4 / 8 simulation from its F, I, W times
    (the numbers of a toy model mean nothing; the path to them must not rot)."""
    out = tmp_path / "pipeline.json"
    result = subprocess.run([sys.executable, "benchmarks/bench_pipeline.py", "--model", "toy", "--schedules",
                             "1f1b_2bp", "--microbatches", "4", "--repeats", "1", "--steps", "3", "--warmup", "1",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text())["runs"]["1f1b_2bp_m4"]
    assert 0 <= row["bubble_measured"] < 1 and 0 < row["bubble_theory"] < 1 and row["step_time_s"] > 0
    assert row["i_ms"] > 0 and row["w_ms"] > 0
    data = json.loads(out.read_text())
    assert {(r["pp"], r["schedule"]) for r in data["deeper"]} == {
        (pp, s) for pp in (4, 8) for s in ("1f1b", "1f1b_2bp", "interleaved_1f1b", "zbv")}
    assert all(0 <= r["bubble"] < 1 for r in data["deeper"])
