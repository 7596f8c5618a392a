"""Shared fixtures: a tiny run config whose tokenizer and preprocessed corpus are built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import load_config

os.environ.setdefault("OMP_NUM_THREADS", "2")
REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=128", "tokenizer.vocab_size=600", "tokenizer.train_sentences=20000",
    "data.embedded_docs=120", "data.seq_len=64", "data.micro_batch_size=4", "data.global_batch_size=8",
    "data.split=90,10,0", "optim.lr=3e-3", "optim.warmup_steps=2", "train.max_steps=20", "train.log_interval=1",
    "train.eval_interval=10", "train.eval_iters=2", "checkpoint.interval=10", "data.preprocess_workers=1",
    "train.precision=fp32",  # (auto would pick bf16 on a CPU with AVX512_BF16: the layout comparisons are fp32's)
]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_overrides(shared_cache, tmp_path) -> list[str]:
    """Overrides for a seconds-long run in a fresh run dir, sharing the session's tokenizer and data."""
    return TINY + [f"tokenizer.path={shared_cache}/tok.model", f"data.prefix={shared_cache}/corpus",
                   f"train.run_dir={tmp_path}/run"]


@pytest.fixture
def tiny_cfg(tiny_overrides):
    def make(*extra: str):
        return load_config(None, [*tiny_overrides, *extra])
    return make


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m pretrain ARGS` the way a user runs the console script."""
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout)


# ---- multi-process layouts against the single-process run (tests/test_distributed.py, test_pipeline.py) ----

def launch_jobs(worker: str, nproc: int, jobs: list[dict], tmp: Path, port: int, timeout: float = 900) -> None:
    """Run every job of ``jobs`` in one process group of ``nproc`` processes of ``tests/WORKER``, started with the
    variables torchrun gives its workers (torchrun's own agent would add an interpreter start-up of a few seconds
    per launch; launching through torchrun is what tests/test_launch.py, test_faults.py and test_hangs.py test).
    The output goes to ``tmp/launchN.log``; when a process fails the others are stopped (their collectives would
    wait for it), and its first errors go into the assertion message."""
    job_file = tmp / f"jobs{nproc}.json"
    job_file.write_text(json.dumps(jobs))
    log = tmp / f"launch{nproc}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    with log.open("w") as out:
        procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / worker), str(job_file)], cwd=REPO,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=out, stderr=out)
                 for r in range(nproc)]
        deadline, codes = time.time() + timeout, {}
        while len(codes) < nproc and time.time() < deadline and not any(codes.values()):
            time.sleep(0.1)
            codes = {r: p.poll() for r, p in enumerate(procs) if p.poll() is not None}
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = log.read_text()
    first_errors = [line for line in text.splitlines() if "Error:" in line][:5]
    assert len(codes) == nproc and not any(codes.values()), (
        f"exit codes {codes} (of {nproc})\n" + "\n".join(first_errors) + "\n" + text[-3000:])


def resume_in_one_process(overrides: list[str], run_dir: Path, from_run: Path, step: int) -> None:
    """Resume ``from_run``'s checkpoint of ``step`` in this single process and train to the end of the schedule
    in ``run_dir``: a checkpoint written under any layout must resume under any other (the caller compares
    the losses after ``step`` with the uninterrupted run's)."""
    from pretrain.train.trainer import run_training

    ckpt = from_run / "checkpoints" / f"step_{step:07d}"
    run_training(load_config(None, [*overrides, f"train.run_dir={run_dir}", "train.stop_at_step=0",
                                    f"train.resume={ckpt}"]), log=lambda *a, **k: None)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def assert_same_grads(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    """The same parameters, each gradient within ``rtol`` relative error (in norm) of the reference."""
    assert ref.keys() == got.keys()
    for name, g in ref.items():
        err = (got[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"
