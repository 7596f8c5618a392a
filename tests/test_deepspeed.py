"""The DeepSpeed engine (parallel.engine: deepspeed) against the native engine, gloo on CPU with 2 processes: the
losses of ZeRO-1/2/3 (with and without offload) for a dense, an MoE and a structured model, gradient accumulation,
resume after a stop and after kill -9, checkpoints that cross engines and world sizes, and export.

One launch runs every comparison job, so the process group starts once."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY, launch_jobs, losses

KINDS = {
    "dense": [],
    "moe": ["model.moe.num_experts=4", "model.moe.top_k=2"],
    "blockdense": ["model.ffn.kind=blockdense", "model.ffn.rank=16", "model.ffn.blocks=2", "model.ffn.dense_blocks=0"],
}
ZERO = {
    "z1": ["parallel.zero_stage=1"],
    "z2": ["parallel.zero_stage=2"],
    "z3": ["parallel.zero_stage=3"],
    "z2_offload": ["parallel.zero_stage=2", "parallel.offload_optimizer=true"],
    "z3_offload": ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true"],
}
PLAN = {"dense": ["z1", "z2", "z3", "z2_offload", "z3_offload"], "moe": ["z1", "z2", "z3"], "blockdense": ["z3"]}
STEPS = ["train.max_steps=6", "checkpoint.interval=3", "train.eval_interval=0", "train.log_interval=1",
         "optim.warmup_steps=1", "parallel.dp_shard=2"]
DS = ["parallel.engine=deepspeed"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    tmp = tmp_path_factory.mktemp("deepspeed")
    (tmp / "defaults.yaml").write_text("{}\n")  # the CLI runs of the same config as the launch's jobs
    base = TINY + [f"tokenizer.path={shared_cache}/tok.model", f"data.prefix={shared_cache}/corpus"] + STEPS
    # (one process builds the tokenizer and data first, so the launch does not)
    from pretrain.config import load_config
    from pretrain.data.prepare import ensure_data, ensure_tokenizer

    cfg = load_config(None, base)
    ensure_data(cfg, ensure_tokenizer(cfg, log=lambda *a: None), log=lambda *a: None)

    def job(name: str, *overrides: str) -> dict:
        return {"overrides": [*base, *overrides, f"train.run_dir={tmp}/{name}"]}

    jobs = []
    for kind, stages in PLAN.items():
        jobs.append(job(f"native_{kind}", *KINDS[kind]))
        jobs += [job(f"{zero}_{kind}", *KINDS[kind], *DS, *ZERO[zero]) for zero in stages]
    jobs += [
        # gradient accumulation 2 (micro-batch 2) against one micro-batch of 4 per rank
        job("z2_accumulate", *DS, "parallel.zero_stage=2", "data.micro_batch_size=2"),
        # stopped after its step-3 checkpoint, then resumed
        job("z3_resumed", *DS, "parallel.zero_stage=3", "train.stop_at_step=3"),
        job("z3_resumed", *DS, "parallel.zero_stage=3"),
        # checkpoints across engines, optimizer state included
        job("native_from_z2", f"train.resume={tmp}/z2_dense/checkpoints/step_0000003"),
        job("z3_from_native", *DS, "parallel.zero_stage=3",
            f"train.resume={tmp}/native_dense/checkpoints/step_0000003"),
    ]
    launch_jobs("dist_worker.py", 2, jobs, tmp, port=29521)
    return tmp, base


@pytest.mark.parametrize("kind,zero", [(kind, zero) for kind, stages in PLAN.items() for zero in stages])
def test_zero_stage_gives_the_native_losses(runs, kind, zero):
    tmp, _ = runs
    ours, native = losses(tmp / f"{zero}_{kind}"), losses(tmp / f"native_{kind}")
    assert sorted(ours) == list(range(1, 7))
    for step in native:
        assert ours[step] == pytest.approx(native[step], abs=1e-5), step


def test_gradient_accumulation_equals_one_double_micro_batch(runs):
    tmp, _ = runs
    accumulated, whole = losses(tmp / "z2_accumulate"), losses(tmp / "z2_dense")
    for step in whole:
        assert accumulated[step] == pytest.approx(whole[step], abs=1e-5), step


@pytest.mark.parametrize("run,reference", [("z3_resumed", "z3_dense"), ("native_from_z2", "z2_dense"),
                                           ("z3_from_native", "native_dense")])
def test_resume_equals_the_uninterrupted_run(runs, run, reference):
    """A ZeRO-3 run stopped and resumed, and checkpoints crossing from DeepSpeed to FSDP2 and back, optimizer state
    included: the steps after the checkpoint give the uninterrupted run's losses."""
    tmp, _ = runs
    resumed, uninterrupted = losses(tmp / run), losses(tmp / reference)
    assert set(range(4, 7)) <= set(resumed)
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


def pretrain_cli(*argv: str, nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """`pretrain ARGV` in one process, or with ``nproc`` through launch/single_node.sh as a user starts it."""
    launcher = ["launch/single_node.sh"] if nproc > 1 else [sys.executable, "-m", "pretrain"]
    argv = argv[1:] if nproc > 1 else argv  # (the launch script's verb is train)
    return subprocess.run([*launcher, *argv], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHON": sys.executable,
                               "NPROC": str(nproc), **(env or {})})


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_in_one_process(runs):
    """ZeRO-3 shards of 2 ranks resume under ZeRO-1 in one process (another world size and stage)."""
    tmp, base = runs
    result = pretrain_cli("train", str(tmp / "defaults.yaml"), *[o for o in base if o != "parallel.dp_shard=2"], *DS,
                          f"train.run_dir={tmp}/z1_one_process", "parallel.zero_stage=1",
                          f"train.resume={tmp}/z3_dense/checkpoints/step_0000003")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, uninterrupted = losses(tmp / "z1_one_process"), losses(tmp / "z3_dense")
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


@pytest.mark.slow
def test_kill_9_and_resume_gives_the_uninterrupted_losses(runs):
    """Through the launch script, unchanged for DeepSpeed: killed inside step 5, started again, the same losses."""
    tmp, base = runs
    argv = ["train", str(tmp / "defaults.yaml"), *base, *DS, "parallel.zero_stage=2", f"train.run_dir={tmp}/killed"]
    killed = pretrain_cli(*argv, nproc=2, env={"PRETRAIN_FAULT": "step.after_backward@5:1"})
    assert killed.returncode != 0 and not (tmp / "killed" / "checkpoints" / "step_0000006").exists()
    resumed = pretrain_cli(*argv, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    after, uninterrupted = losses(tmp / "killed"), losses(tmp / "z2_dense")
    for step in range(1, 7):
        assert after[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


def test_export_of_a_zero3_checkpoint_equals_the_export_of_its_weights_in_one_process(runs, tmp_path):
    """`pretrain export` reads the ZeRO-3 checkpoint (its tensors whole under their names); a single-process
    checkpoint of the same weights exports to the same files."""
    import shutil

    import pretrain
    from pretrain.convert.hf import export_checkpoint
    from pretrain.train import checkpoint

    tmp, _ = runs
    zero3 = tmp / "z3_dense" / "checkpoints" / "step_0000006"
    model = pretrain.load_model(zero3)
    single = tmp_path / "step_0000006"
    single.mkdir()
    checkpoint.save_states(single, {"model": model.state_dict()})
    for name in ("config.yaml", "trainer_state.json"):
        shutil.copy(zero3 / name, single / name)
    a, b = export_checkpoint(zero3, tmp_path / "hf_zero3"), export_checkpoint(single, tmp_path / "hf_single")
    ours, theirs = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_bf16_autocast_reaches_the_matmuls_inside_deepspeed():
    """DeepSpeed's engine switches an autocast entered around it off; ours runs inside the model's forward, so a
    bf16 run's logits come out of bf16 matmuls (the same as in the native engine)."""
    script = """
import torch
from pretrain.config import load_config, resolve
from pretrain.parallel import mesh
from pretrain.train.engines import build_engine
cfg = resolve(load_config(None, ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
                                 "model.ffn_hidden_size=128", "train.precision=bf16", "parallel.engine=deepspeed"]), 640)
dims, device = mesh.setup(cfg.parallel, torch.device("cpu"))
engine = build_engine(cfg, dims, device)
tokens = torch.randint(0, 640, (2, 16))
with torch.no_grad():
    print("dtypes", engine.ds(tokens).dtype, engine.model(tokens).dtype)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dtypes torch.bfloat16 torch.bfloat16" in result.stdout
