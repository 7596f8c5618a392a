"""Every parallel layout against the single-process model (gloo on CPU): loss and every parameter's
gradient after one step, losses over 5 steps, and checkpoints that resume under another layout.

One launch per world size runs all of its layouts, so each process group starts once."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_same_grads, launch_jobs, losses, resume_in_one_process

REPO = Path(__file__).resolve().parents[1]
KINDS = {
    "dense": [],
    "moe": ["model.moe.num_experts=4", "model.moe.top_k=2"],
    # balance and z losses over the global micro-batch: 2 ranks x 4 samples == 1 process x 8 samples
    "moe_global": ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.balance_scope=global",
                   "data.micro_batch_size=8"],
    "lowrank_sgt": ["model.ffn.kind=lowrank", "model.ffn.rank=16", "model.ffn.dense_blocks=0",
                    "model.ffn.self_guided.enabled=true", "model.ffn.self_guided.guided_steps=3"],
    "blockdense": ["model.ffn.kind=blockdense", "model.ffn.rank=16", "model.ffn.blocks=2", "model.ffn.dense_blocks=0"],
    "blockshuffle": ["model.ffn.kind=blockshuffle", "model.ffn.blocks=2", "model.ffn.dense_blocks=0"],
}
LAYOUTS = {  # name: (processes, overrides)
    "dp_shard2": (2, ["parallel.dp_shard=2"]),
    "dp_replicate2": (2, ["parallel.dp_replicate=2"]),
    "zero2": (2, ["parallel.dp_shard=2", "parallel.reshard_after_forward=false"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "ep2": (2, ["parallel.dp_shard=2", "parallel.ep=2"]),
    "dp_shard2_mb4": (2, ["parallel.dp_shard=2", "data.micro_batch_size=4"]),
    "ep2_mb4": (2, ["parallel.dp_shard=2", "parallel.ep=2", "data.micro_batch_size=4"]),
    "tp2_dp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "data.micro_batch_size=2"]),
    "ep2_tp2": (4, ["parallel.dp_shard=2", "parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    # the speed switches under a layout
    "dp_shard2_compile": (2, ["parallel.dp_shard=2", "train.compile=true"]),
    "dp_shard2_recompute": (2, ["parallel.dp_shard=2", "train.activation_checkpointing=full"]),
    "tp2_sp_recompute": (2, ["parallel.tp=2", "parallel.sequence_parallel=true",
                             "train.activation_checkpointing=selective"]),
    "ep2_compile_recompute": (2, ["parallel.dp_shard=2", "parallel.ep=2", "train.compile=true",
                                  "train.activation_checkpointing=selective"]),
}
PLAN = {
    "dense": ["dp_shard2", "dp_replicate2", "zero2", "tp2", "tp2_sp", "tp2_dp2", "hsdp2x2", "dp_shard2_compile",
              "dp_shard2_recompute", "tp2_sp_recompute"],
    "moe": ["dp_shard2", "dp_replicate2", "tp2", "tp2_sp", "ep2", "ep2_tp2", "tp2_sp_recompute", "ep2_compile_recompute"],
    "moe_global": ["dp_shard2_mb4", "ep2_mb4"],
    "lowrank_sgt": ["dp_shard2", "tp2", "tp2_sp", "tp2_dp2"],
    "blockdense": ["tp2", "tp2_sp"],
    "blockshuffle": ["tp2", "tp2_sp"],
}
CASES = [(kind, layout) for kind, layouts in PLAN.items() for layout in layouts]
# Resumed in one process: every layout once (dense), and each other kind under the layout that reshards it most.
RESUMED = {("dense", layout) for layout in PLAN["dense"]} | {
    ("moe", "ep2"), ("moe", "ep2_tp2"), ("moe", "tp2_sp"), ("moe_global", "ep2_mb4"), ("lowrank_sgt", "tp2_dp2"),
    ("blockdense", "tp2_sp"), ("blockshuffle", "tp2_sp")}
STEPS = ["train.max_steps=6", "train.stop_at_step=5", "checkpoint.interval=5", "train.eval_interval=0",
         "train.log_interval=1", "optim.warmup_steps=1"]
NO_CHECKPOINT = ["checkpoint.interval=0", "checkpoint.save_final=false"]  # the jobs no test resumes


def launch(nproc: int, jobs: list[dict], tmp: Path) -> None:
    launch_jobs("dist_worker.py", nproc, jobs, tmp, port=29500 + nproc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    """Single-process references, then every layout (one launch per world size), then each layout's
    step-5 checkpoint resumed in a single process and the reference's checkpoint resumed under tp2."""
    from pretrain.config import load_config
    from tests.conftest import TINY
    from tests.dist_worker import train_capturing

    tmp = tmp_path_factory.mktemp("dist")
    base = TINY + [f"tokenizer.path={shared_cache}/tok.model", f"data.prefix={shared_cache}/corpus"] + STEPS
    for kind, extra in KINDS.items():  # reference: uninterrupted to step 6, with a checkpoint at 5
        train_capturing(load_config(None, base + extra + [f"train.run_dir={tmp}/ref_{kind}",
                                                          "train.stop_at_step=0"]), tmp / f"ref_{kind}.pt")
    jobs: dict[int, list] = {2: [], 4: []}
    for kind, layout in CASES:
        nproc, overrides = LAYOUTS[layout]
        save = [] if (kind, layout) in RESUMED else NO_CHECKPOINT  # (only the resumed ones are saved)
        jobs[nproc].append({"overrides": base + KINDS[kind] + overrides + [f"train.run_dir={tmp}/{kind}_{layout}", *save],
                            "grads": str(tmp / f"{kind}_{layout}.pt")})
    jobs[2].append({"overrides": base + ["parallel.dp_shard=2", "parallel.param_dtype=bf16",
                                         f"train.run_dir={tmp}/dense_bf16_params", *NO_CHECKPOINT]})
    for kind in ("dense", "moe"):  # a single-process checkpoint resumed under another layout
        layout = "ep2" if kind == "moe" else "tp2"
        ref_ckpt = tmp / f"ref_{kind}" / "checkpoints" / "step_0000005"
        jobs[2].append({"overrides": base + KINDS[kind] + LAYOUTS[layout][1] + [
            f"train.run_dir={tmp}/{kind}_from_single", f"train.resume={ref_ckpt}", "train.stop_at_step=0",
            *NO_CHECKPOINT]})
    for nproc, job_list in jobs.items():
        launch(nproc, job_list, tmp)
    for kind, layout in RESUMED:  # a checkpoint of every layout (and of each kind's resharded weights) in one process
        resume_in_one_process(base + KINDS[kind], tmp / f"resume_{kind}_{layout}", tmp / f"{kind}_{layout}", 5)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("kind, layout", CASES)
def test_layout_matches_single_process(runs, kind, layout):
    assert_same_grads(torch.load(runs / f"ref_{kind}.pt"), torch.load(runs / f"{kind}_{layout}.pt"))
    a, b = losses(runs / f"ref_{kind}"), losses(runs / f"{kind}_{layout}")
    assert abs(a[1] - b[1]) <= 1e-5 * abs(a[1])
    for step in range(1, 6):
        assert abs(a[step] - b[step]) <= 1e-4, (step, a[step], b[step])
    if (kind, layout) in RESUMED:  # saved under the layout, resumed in one process
        resumed = losses(runs / f"resume_{kind}_{layout}")
        assert sorted(resumed) == [6] and abs(resumed[6] - a[6]) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_single_process_checkpoint_resumes_under_a_layout(runs, kind):
    a, b = losses(runs / f"ref_{kind}"), losses(runs / f"{kind}_from_single")
    assert sorted(b) == [6] and abs(a[6] - b[6]) <= 1e-4


@pytest.mark.slow
def test_fsdp_bf16_parameters_with_fp32_reduction_track_fp32(runs):
    a, b = losses(runs / "ref_dense"), losses(runs / "dense_bf16_params")
    for step in range(1, 6):
        assert abs(a[step] - b[step]) <= 2e-2 * abs(a[step]), (step, a[step], b[step])


@pytest.mark.slow
def test_moe_load_metrics_cover_every_data_parallel_rank(runs):
    lines = (runs / "moe_dp_replicate2" / "metrics.jsonl").read_text().splitlines()
    rec = [r for r in map(json.loads, lines) if "loss" in r][-1]
    counts = rec["moe_tokens_per_expert/blocks_0_ffn"]
    assert sum(counts) == 2 * 4 * 64 * 2  # two ranks' micro-batches of 4 x 64 tokens, top-2
