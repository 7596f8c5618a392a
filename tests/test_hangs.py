"""Multi-process runs that stop answering, and the signals that stop them on purpose: a stopped rank is named by
the watchdog while the others wait and by the collective timeout that ends the run; SIGUSR1 sent to the launch
script reaches every worker through torchrun, the run checkpoints, exits 75 and resumes without losing a step."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, losses

STEPS = ["train.eval_interval=0", "train.log_interval=1", "checkpoint.interval=0", "optim.warmup_steps=1",
         "parallel.dp_shard=2", "train.signal_check_interval=1"]


def launch(tiny_overrides, run_dir: Path, *extra: str, **env_vars: str) -> subprocess.Popen:
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "2", "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.Popen(["launch/single_node.sh", "configs/quickstart.yaml", *tiny_overrides, *STEPS,
                             f"train.run_dir={run_dir}", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} logged steps: {proc.poll()} {proc.stderr.read()[-3000:] if proc.poll() else ''}")


def worker(rank: int, run_dir: Path) -> int:
    """The pid of the training process of ``rank`` for this run directory."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"train.run_dir={run_dir}".encode() in cmdline and f"RANK={rank}".encode() in environ \
                and b"pretrain" in cmdline and b"torch.distributed.run" not in b" ".join(cmdline):
            return pid
    raise AssertionError(f"no rank {rank} process for {run_dir}")


@pytest.mark.slow
def test_a_stopped_rank_is_named_by_the_watchdog_and_the_collective_timeout(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(tiny_overrides, run_dir, "train.max_steps=2000", "parallel.collective_timeout_s=6",
                  "train.watchdog_min_s=2", "train.watchdog_factor=5")
    stopped = None
    try:
        wait_for_steps(run_dir, 3, proc)
        waiting, stopped = worker(0, run_dir), worker(1, run_dir)
        os.kill(stopped, signal.SIGSTOP)
        deadline = time.time() + 120
        while Path(f"/proc/{waiting}").exists() and time.time() < deadline:  # until rank 0 gives up
            time.sleep(0.1)
        os.kill(stopped, signal.SIGKILL)  # (torchrun would wait 30 s for the stopped one to end)
        out, err = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun may have ended it already
            if stopped is not None:
                os.kill(stopped, signal.SIGKILL)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, 2, 75)
    assert "[watchdog] rank 0: step" in err and "has taken" in err, err[-3000:]
    assert "rank 0: a collective did not complete within parallel.collective_timeout_s=6 s during step" in err, (
        err[-3000:])


@pytest.mark.slow
def test_sigusr1_to_the_launch_script_checkpoints_exits_75_and_resumes_exactly(tiny_overrides, tmp_path):
    steps = 20
    whole = launch(tiny_overrides, tmp_path / "whole", f"train.max_steps={steps}")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
    run_dir = tmp_path / "run"
    proc = launch(tiny_overrides, run_dir, f"train.max_steps={steps}")
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    stopped = int((run_dir / "preempted").read_text())
    assert 3 <= stopped < steps and (run_dir / "checkpoints" / f"step_{stopped:07d}").is_dir()
    again = launch(tiny_overrides, run_dir, f"train.max_steps={steps}")
    assert again.wait(timeout=300) == 0, again.stderr.read()[-3000:]
    got, want = losses(run_dir), losses(tmp_path / "whole")
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == [want[s] for s in range(1, steps + 1)]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # none lost, none repeated
