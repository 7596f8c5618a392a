"""slurm/train.sbatch run by a real SLURM: Debian's slurm-wlm with two emulated nodes on this machine
(tests/slurm/slurm_local.sh brings it up and stops only the daemons it started). Without root and apt
the tests are skipped with the reason."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.train.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "slurm" / "slurm_local.sh"
STEPS = ["train.eval_interval=0", "train.log_interval=1", "optim.warmup_steps=1"]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("a local SLURM cluster needs root and apt-get (Debian's slurm-wlm); not available here")
    env = {**os.environ, "SLURM_LOCAL_NODES": "2"}
    up = subprocess.run(["bash", str(HARNESS), "up"], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    yield env
    subprocess.run(["bash", str(HARNESS), "down"], env=env, capture_output=True, text=True, timeout=120)


def submit(slurm_env: dict, args: list[str], out: Path) -> str:
    env = {**slurm_env, "PYTHON": sys.executable, "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["sbatch", "--parsable", f"--output={out}", "slurm/train.sbatch", *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(job: str) -> str | None:
    """The job's state as squeue shows it, "" once it has left the queue, None when squeue did not answer (a busy
    slurmctld times out: that is not a finished job)."""
    queue = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    if queue.returncode != 0 and "Invalid job id" not in queue.stderr:
        return None
    return queue.stdout.strip()


def wait_gone(job: str, timeout: float = 600) -> None:
    """Until the job has left the queue: three answers in a row a second apart, since a job being requeued can be
    missing from squeue for a moment."""
    deadline, gone = time.time() + timeout, 0
    while time.time() < deadline:
        gone = gone + 1 if job_state(job) == "" else 0
        if gone == 3:
            return
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def reference(tiny_overrides, run_dir: Path, max_steps: int) -> dict[int, float]:
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      [*tiny_overrides, *STEPS, f"train.max_steps={max_steps}", f"train.run_dir={run_dir}"])
    run_training(cfg, log=lambda *a: None)
    return losses(run_dir)


@pytest.mark.slow
def test_two_node_job_preempted_requeues_and_resumes_without_losing_a_step(slurm, tiny_overrides, tmp_path):
    """A data-parallel job on both nodes gives the single-process losses; SIGUSR1 (SLURM's warning before a
    preemption) makes it checkpoint, requeue itself and continue from that step in its next allocation."""
    steps = 60
    expected = reference(tiny_overrides, tmp_path / "ref", steps)
    run_dir = tmp_path / "slurm_run"
    out = tmp_path / "job.out"
    job = submit(slurm, ["configs/quickstart.yaml", *tiny_overrides, *STEPS, f"train.max_steps={steps}",
                         "parallel.dp_shard=2", f"train.run_dir={run_dir}"], out)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.time() + 300
    while time.time() < deadline and "requeueing" not in out.read_text():
        time.sleep(0.2)
    # SLURM holds a requeued job back for a while before it may start again; the test need not wait for that, but
    # a restart within the second its credential was revoked is refused ("Job credential revoked"): wait 3 s
    for _ in range(100):
        if "PENDING" in (job_state(job) or ""):
            time.sleep(3)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
            break
        time.sleep(0.2)
    wait_gone(job)
    log = out.read_text()
    assert "on n[1-2]" in log, log[-3000:]
    assert "preempted at step" in log and "requeueing" in log, log[-3000:]
    assert "(restart 1)" in log, log[-3000:]
    got = losses(run_dir)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, steps + 1))  # none lost, none repeated
    assert [got[s] for s in range(1, steps + 1)] == pytest.approx([expected[s] for s in range(1, steps + 1)], abs=1e-4)


@pytest.mark.slow
def test_assembled_run_as_dependent_jobs(slurm, tiny_overrides, tmp_path):
    """slurm/assemble.sh: the meta job, the incubations as a job array after it, the join after the array."""
    run_dir = tmp_path / "assembled"
    config = tmp_path / "assembled.yaml"
    config.write_text("assembly:\n  modules: 2\n  meta_steps: 3\n  incubation_steps: 3\n")
    env = {**slurm, "PYTHON": sys.executable, "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1",
           "META_SBATCH": f"--nodes 1 --output={tmp_path}/meta.out",
           "INCUBATE_SBATCH": f"--nodes 1 --output={tmp_path}/module_%a.out",
           "JOIN_SBATCH": f"--nodes 1 --output={tmp_path}/join.out"}
    result = subprocess.run(["slurm/assemble.sh", str(config), *tiny_overrides, *STEPS, "model.num_layers=4",
                             "train.max_steps=4", f"train.run_dir={run_dir}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    join_job = result.stdout.split("join: job ")[1].split()[0]
    wait_gone(join_job)
    outputs = {name: (tmp_path / f"{name}.out").read_text() for name in ("meta", "module_1", "module_2", "join")}
    assert sorted(losses(run_dir / "join")) == [1, 2, 3, 4], outputs["join"][-3000:]
    for k in (1, 2):  # each array task incubated its own module, after the meta model was finished
        assert sorted(losses(run_dir / f"module_{k}")) == [1, 2, 3], outputs[f"module_{k}"][-3000:]
        assert f"run dir {run_dir / f'module_{k}'}" in outputs[f"module_{k}"]
    first = {part: json.loads((run_dir / part / "metrics.jsonl").read_text().splitlines()[0])["time"]
             for part in ("module_1", "module_2", "join")}
    last = {part: json.loads((run_dir / part / "metrics.jsonl").read_text().splitlines()[-1])["time"]
            for part in ("meta", "module_1", "module_2")}
    assert min(first["module_1"], first["module_2"]) > last["meta"]
    assert first["join"] > max(last["module_1"], last["module_2"])
    assert "compute by phase" in outputs["join"]
