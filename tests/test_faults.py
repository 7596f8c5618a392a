"""Fault injection: a run killed anywhere (mid-step, at every point of a save, one rank of two) resumes with the
uninterrupted run's data positions and losses; damaged checkpoints (truncated, altered, incomplete) are named
and auto resume falls back past them; a full disk leaves the previous checkpoint intact and says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pretrain.train import checkpoint
from tests.conftest import REPO

STEPS = ["train.max_steps=8", "checkpoint.interval=2", "train.eval_interval=0", "train.log_interval=1",
         "checkpoint.keep=3", "optim.warmup_steps=1"]


def cli(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def trace(run_dir: Path) -> dict[int, tuple]:
    """Per step: the data position after it and the loss, bit for bit."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: (r["consumed_samples"], r["loss"]) for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_cache):
    """The uninterrupted run, for every test here."""
    from tests.conftest import TINY

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    common = [*TINY, f"tokenizer.path={shared_cache}/tok.model", f"data.prefix={shared_cache}/corpus", *STEPS]
    result = cli("train", "configs/quickstart.yaml", *common, f"train.run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return common, trace(run_dir)


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_data_and_losses(reference, tmp_path):
    """Killed mid-step, then at three points of later saves, each time resumed: the uninterrupted run's data
    positions and losses, bit for bit, and no half-written checkpoint left."""
    common, expected = reference
    args = ["train", "configs/quickstart.yaml", *common, f"train.run_dir={tmp_path}/run"]
    for fault in ("step.after_backward@3", "save.after_shards@4", "save.before_rename@6", "save.after_rename@8"):
        killed = cli(*args, env={"PRETRAIN_FAULT": fault})
        assert killed.returncode == -9, (fault, killed.stderr[-2000:])
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert trace(tmp_path / "run") == expected
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_one_rank_killed_mid_step_the_job_resumes_exactly(reference, tmp_path):
    import sys

    common, _ = reference
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pretrain",
           "train", "configs/quickstart.yaml", *common, "parallel.dp_shard=2", "train.signal_check_interval=1"]
    whole = subprocess.run([*cmd, f"train.run_dir={tmp_path}/whole"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = subprocess.run([*cmd, f"train.run_dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**env, "PRETRAIN_FAULT": "step.after_backward@5:1"})
    assert killed.returncode != 0
    again = subprocess.run([*cmd, f"train.run_dir={tmp_path}/run"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert trace(tmp_path / "run") == trace(tmp_path / "whole")


def _newest(run_dir: Path) -> Path:
    return checkpoint.complete_checkpoints(run_dir / "checkpoints")[-1]


@pytest.fixture(scope="module")
def stopped_at_6(reference, tmp_path_factory) -> Path:
    """A run stopped after step 6 (checkpoints at 2, 4, 6), copied by each test that damages it."""
    common, _ = reference
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    result = cli("train", "configs/quickstart.yaml", *common, f"train.run_dir={run_dir}", "train.stop_at_step=6")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated shard", "altered bytes", "deleted metadata", "deleted state"])
def test_damaged_newest_checkpoint_is_named_and_auto_falls_back(reference, stopped_at_6, tmp_path, damage):
    common, expected = reference
    args = ["train", "configs/quickstart.yaml", *common, f"train.run_dir={tmp_path}/run"]
    shutil.copytree(stopped_at_6, tmp_path / "run")
    newest = _newest(tmp_path / "run")
    assert newest.name == "step_0000006"
    shard = next(newest.glob("*.distcp"))
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "altered bytes":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one bit pattern inside a weight, the size unchanged
        shard.write_bytes(bytes(data))
    elif damage == "deleted metadata":
        (newest / ".metadata").unlink()
    else:
        (newest / "trainer_state.json").unlink()
    explicit = cli(*args, f"train.resume={newest}")
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    named = {"truncated shard": shard.name, "altered bytes": shard.name, "deleted metadata": "complete checkpoint",
             "deleted state": "complete checkpoint"}[damage]
    assert named in explicit.stderr, explicit.stderr
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    said = {"truncated shard": f"{shard.name} has", "altered bytes": "SHA-256 differs",
            "deleted metadata": "incomplete (no .metadata)", "deleted state": "incomplete (no trainer_state.json)"}
    assert said[damage] in again.stdout and "step_0000004" in again.stdout, again.stdout[-3000:]
    assert trace(tmp_path / "run") == expected  # steps 5-8 again from step 4, exactly


@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(reference, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    common, _ = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()[:200]}")
    try:
        # one checkpoint of the tiny model takes about 1.1 MB: the second fits, the third does not
        result = cli("train", "configs/quickstart.yaml", *common, f"train.run_dir={disk}/run", "checkpoint.keep=5",
                     "logging.tensorboard=false")
        assert result.returncode == 2, result.stderr[-3000:]
        assert "no space left on the device" in result.stderr and f"{disk}/run/checkpoints/step_" in result.stderr
        assert "Traceback" not in result.stderr
        kept = checkpoint.complete_checkpoints(disk / "run" / "checkpoints")
        assert kept and all(checkpoint.damage(path) is None for path in kept)
        assert f"{kept[-1]}, is intact" in result.stderr
        assert not list((disk / "run" / "checkpoints").glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
        shutil.rmtree(disk, ignore_errors=True)


def test_unknown_fault_point_is_refused(monkeypatch):
    from pretrain.train import faults

    monkeypatch.setenv("PRETRAIN_FAULT", "save.nowhere")
    with pytest.raises(ValueError, match="unknown point"):
        faults.reached("save.begin", 1)
