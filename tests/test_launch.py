"""Launching like a user: torchrun through launch/single_node.sh, two torchrun node agents through
launch/multi_node.sh (c10d rendezvous on 127.0.0.1), and the world-size check."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.train.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
STEPS = ["train.max_steps=4", "train.eval_interval=0", "checkpoint.interval=0", "train.log_interval=1"]


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def reference(tiny_overrides, tmp_path) -> list[float]:
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*tiny_overrides, *STEPS, f"train.run_dir={tmp_path}/ref"])
    run_training(cfg, log=lambda *a: None)
    return losses(tmp_path / "ref")


@pytest.mark.slow
def test_single_node_script_runs_two_processes_and_only_rank0_logs(tiny_overrides, tmp_path, reference):
    args = [*tiny_overrides, *STEPS, f"train.run_dir={tmp_path}/sn", "parallel.dp_shard=2"]
    result = subprocess.run(["launch/single_node.sh", "configs/quickstart.yaml", *args], cwd=REPO,
                            env=env(NPROC="2"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("done in") == 1
    assert losses(tmp_path / "sn") == pytest.approx(reference, abs=1e-4)


@pytest.mark.slow
def test_two_node_agents_rendezvous_on_localhost(tiny_overrides, tmp_path, reference):
    args = [*tiny_overrides, *STEPS, f"train.run_dir={tmp_path}/mn", "parallel.dp_shard=2"]
    node_env = env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   RDZV_ID="test-two-nodes")
    agents = [subprocess.Popen(["launch/multi_node.sh", "configs/quickstart.yaml", *args], cwd=REPO, env=node_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-4000:]
    assert losses(tmp_path / "mn") == pytest.approx(reference, abs=1e-4)


@pytest.mark.slow
def test_world_size_that_does_not_match_the_layout_stops_with_the_fix(tiny_overrides, tmp_path):
    args = [*tiny_overrides, *STEPS, f"train.run_dir={tmp_path}/bad"]  # layout of 1 process, 2 started
    result = subprocess.run(["launch/single_node.sh", "configs/quickstart.yaml", *args], cwd=REPO,
                            env=env(NPROC="2"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2  # checked before any process starts
    assert "2 process(es) would start, but the layout needs 1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "bad").exists()
