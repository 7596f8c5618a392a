"""Pipeline parallelism against the single-process model (gloo on CPU): every schedule at pp2, pp2 x tp2 and
pp2 x dp2, for dense, tied, MoE and structured models; two-stage backprop that really defers the weight
gradients; checkpoints that resume at another pp; end-of-run sampling; the stage split; the schedule orders and
their timeline.

One launch per world size runs every job of that size (tests/dist_worker.py)."""

import json
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.parallel import schedules
from pretrain.parallel.stages import balance, stage_blocks, stage_costs
from tests.conftest import assert_same_grads, launch_jobs, losses, records, resume_in_one_process

REPO = Path(__file__).resolve().parents[1]
KINDS = {
    "dense": [],
    "tied": ["model.tie_embeddings=true"],
    "moe": ["model.moe.num_experts=4", "model.moe.top_k=2"],
    "lowrank": ["model.ffn.kind=lowrank", "model.ffn.rank=16", "model.ffn.dense_blocks=0"],
    "blockshuffle": ["model.ffn.kind=blockshuffle", "model.ffn.blocks=2", "model.ffn.dense_blocks=0"],
}
VIRTUAL = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zero_bubble": 2, "zbv": 2, "dualpipev": 2,
           "gpipe_2bp": 1, "1f1b_2bp": 1}
LAYOUTS = {  # name: (processes, overrides)
    **{s: (2, ["parallel.pp=2", f"parallel.pp_schedule={s}", f"parallel.pp_virtual={v}"]) for s, v in VIRTUAL.items()},
    "1f1b_2bp_batched": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b_2bp", "parallel.pp_batch_weight_grads=true"]),
    "zbv_batched": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=2",
                        "parallel.pp_batch_weight_grads=true"]),
    "1f1b_recompute": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "train.activation_checkpointing=full"]),
    "interleaved_recompute": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual=2",
                                  "train.activation_checkpointing=selective"]),
    "1f1b_2bp_recompute": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b_2bp", "train.activation_checkpointing=full"]),
    "zbv_recompute": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=2",
                          "train.activation_checkpointing=selective"]),
    "pp4_1f1b": (4, ["parallel.pp=4", "parallel.pp_schedule=1f1b"]),  # a middle rank holds neither end
    "pp4_1f1b_2bp": (4, ["parallel.pp=4", "parallel.pp_schedule=1f1b_2bp"]),
    "pp2_tp2": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=1f1b_2bp"]),
    "pp2_tp2_sp": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                       "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual=2"]),
    "pp2_fsdp2": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=2"]),
    "pp2_fsdp2_recompute": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=zbv",
                                "parallel.pp_virtual=2", "train.activation_checkpointing=selective"]),
    "pp2_ddp2": (4, ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.pp_schedule=1f1b_2bp"]),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.ep=2", "parallel.pp_schedule=gpipe_2bp"]),
    "pp2_tp2_sp_batched": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                               "parallel.pp_schedule=1f1b_2bp", "parallel.pp_batch_weight_grads=true"]),
    "pp2_fsdp2_batched": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=gpipe_2bp",
                              "parallel.pp_batch_weight_grads=true"]),
    "pp2_ddp2_batched": (4, ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.pp_schedule=1f1b_2bp",
                             "parallel.pp_batch_weight_grads=true"]),
}
PLAN = {
    "dense": [*VIRTUAL, "1f1b_2bp_batched", "zbv_batched", "1f1b_recompute", "1f1b_2bp_recompute", "zbv_recompute",
              "pp2_tp2", "pp2_tp2_sp", "pp2_fsdp2", "pp2_ddp2", "pp4_1f1b_2bp", "pp2_tp2_sp_batched", "pp2_fsdp2_batched",
              "pp2_fsdp2_recompute"],
    "tied": ["1f1b", "zbv", "zbv_batched", "pp2_tp2", "pp2_ddp2", "pp4_1f1b", "pp2_fsdp2"],  # zbv: both ends on rank 0
    "moe": [*VIRTUAL, "1f1b_2bp_batched", "interleaved_recompute", "1f1b_2bp_recompute", "zbv_recompute",
            "pp4_1f1b_2bp", "pp2_tp2", "pp2_fsdp2", "pp2_ep2"],
    "lowrank": [*VIRTUAL, "1f1b_2bp_batched", "pp2_tp2", "pp2_fsdp2", "pp2_ddp2_batched"],
    # (block-shuffle under tp2: tests/test_distributed.py; under pp2 x tp2 it was the slowest job here, 6 s of 38)
    "blockshuffle": ["gpipe_2bp", "pp2_ddp2"],
}
CASES = [(kind, layout) for kind, layouts in PLAN.items() for layout in layouts]
PROBED = [("dense", "1f1b"), ("dense", "1f1b_2bp"), ("moe", "1f1b"), ("moe", "1f1b_2bp"), ("lowrank", "1f1b"),
          ("lowrank", "1f1b_2bp"), ("dense", "1f1b_recompute"), ("dense", "1f1b_2bp_recompute"),
          ("lowrank", "1f1b_2bp_batched")]
SIZE = ["model.num_layers=4", "data.micro_batch_size=2"]  # 4 blocks for 2 x 2 stages; 4 microbatches at dp 1
STEPS = ["train.max_steps=4", "train.stop_at_step=3", "checkpoint.interval=3", "train.eval_interval=0",
         "train.log_interval=1", "optim.warmup_steps=1"]
NO_CHECKPOINT = ["checkpoint.interval=0", "checkpoint.save_final=false"]  # the jobs no test resumes
PROMPT, SAMPLE_TOKENS = "The list", 16
SAMPLED = ["zbv", "pp2_tp2", "pp2_fsdp2"]  # the last stage on rank 0; with tensor, with data parallelism
RESUMED = [("dense", "1f1b_2bp"), ("dense", "zbv"), ("tied", "1f1b"), ("moe", "zbv"), ("dense", "pp2_fsdp2"),
           ("tied", "pp2_fsdp2")]


def merged_grads(prefix: Path, nproc: int) -> dict[str, torch.Tensor]:
    """Every rank's gradients under their global names; ranks holding the same parameter must agree."""
    merged: dict[str, torch.Tensor] = {}
    for rank in range(nproc):
        for name, g in torch.load(f"{prefix}.rank{rank}.pt").items():
            if name in merged:
                assert torch.equal(merged[name], g), f"{name} differs between ranks"
            merged[name] = g
    return merged


def launch(nproc: int, jobs: list[dict], tmp: Path) -> None:
    launch_jobs("dist_worker.py", nproc, jobs, tmp, port=29600 + nproc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    """Single-process references (uninterrupted, checkpoint at step 3), every pipeline layout to step 3 with
    its checkpoint, the probed schedules, the reference checkpoint resumed at pp2, and each pp2 checkpoint
    resumed in one process."""
    from tests.conftest import TINY
    from tests.dist_worker import train_capturing

    tmp = tmp_path_factory.mktemp("pipeline")
    base = TINY + SIZE + [f"tokenizer.path={shared_cache}/tok.model", f"data.prefix={shared_cache}/corpus"] + STEPS
    for kind, extra in KINDS.items():
        trainer = train_capturing(load_config(None, base + extra + [f"train.run_dir={tmp}/ref_{kind}",
                                                                    "train.stop_at_step=0"]), tmp / f"ref_{kind}.pt")
        if kind == "dense":
            (tmp / "ref_dense.sample").write_text(trainer.sample(PROMPT, SAMPLE_TOKENS))
    jobs: dict[int, list] = {2: [], 4: []}
    for kind, layout in CASES:
        nproc, overrides = LAYOUTS[layout]
        save = [] if (kind, layout) in RESUMED else NO_CHECKPOINT  # (only the resumed ones are saved)
        jobs[nproc].append({"overrides": base + KINDS[kind] + overrides + [f"train.run_dir={tmp}/{kind}_{layout}", *save],
                            "grads": str(tmp / f"{kind}_{layout}"), "per_rank": True})
    for kind, layout in PROBED:
        jobs[2].append({"overrides": base + KINDS[kind] + LAYOUTS[layout][1] + [
            f"train.run_dir={tmp}/probe_{kind}_{layout}", "train.max_steps=1", "train.stop_at_step=0",
            *NO_CHECKPOINT], "probe": str(tmp / f"probe_{kind}_{layout}")})
    jobs[2].append({"overrides": base + LAYOUTS["zbv"][1] + [
        f"train.run_dir={tmp}/dense_from_single", "train.stop_at_step=0",
        f"train.resume={tmp}/ref_dense/checkpoints/step_0000003", *NO_CHECKPOINT]})
    for layout in SAMPLED:  # the reference's final weights, no step: sampling only
        nproc, overrides = LAYOUTS[layout]
        jobs[nproc].append({"overrides": base + overrides + [
            f"train.run_dir={tmp}/sample_{layout}", "train.stop_at_step=0", f"train.sample_prompt={PROMPT}",
            f"train.sample_tokens={SAMPLE_TOKENS}", f"train.resume={tmp}/ref_dense/checkpoints/step_0000004"],
            "sample": str(tmp / f"sample_{layout}")})
    for nproc, job_list in jobs.items():
        launch(nproc, job_list, tmp)
    for kind, layout in RESUMED:
        resume_in_one_process(base + KINDS[kind], tmp / f"resume_{kind}_{layout}", tmp / f"{kind}_{layout}", 3)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("kind, layout", CASES)
def test_pipeline_matches_single_process_grads(runs, kind, layout):
    ref = torch.load(runs / f"ref_{kind}.pt")
    assert_same_grads(ref, merged_grads(runs / f"{kind}_{layout}", LAYOUTS[layout][0]))
    a, b = losses(runs / f"ref_{kind}"), losses(runs / f"{kind}_{layout}")
    assert sorted(b) == [1, 2, 3]
    assert abs(a[1] - b[1]) <= 1e-5 * abs(a[1])
    for step in (2, 3):
        assert abs(a[step] - b[step]) <= 1e-4, (step, a[step], b[step])
    norms = [{r["step"]: r["grad_norm"] for r in records(runs / run) if "grad_norm" in r}
             for run in (f"ref_{kind}", f"{kind}_{layout}")]
    # The clip norm spans every stage and counts a tied weight once (a stage missing or counted twice moves it
    # by percents); 1e-4, as tensor parallelism alone already moves it by up to 6e-5 (tp2 without pp, too).
    assert norms[1][1] == pytest.approx(norms[0][1], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind, split, whole", [("dense", "1f1b_2bp", "1f1b"), ("moe", "1f1b_2bp", "1f1b"),
                                                ("lowrank", "1f1b_2bp", "1f1b"),
                                                ("dense", "1f1b_2bp_recompute", "1f1b_recompute")])
def test_2bp_gradients_bit_equal_to_1f1b(runs, kind, split, whole):
    a, b = merged_grads(runs / f"{kind}_{whole}", 2), merged_grads(runs / f"{kind}_{split}", 2)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("kind, layout, plain", [("dense", "1f1b_2bp_recompute", "1f1b"), ("moe", "1f1b_2bp_recompute", "1f1b"),
                                                 ("dense", "zbv_recompute", "zbv"), ("moe", "zbv_recompute", "zbv")])
def test_checkpointing_under_split_backward_changes_no_gradient_bit(runs, kind, layout, plain):
    """One recomputation per block serves both the input and the weight backward, and it reproduces the forward
    exactly (same ops, RNG and autocast state): full and selective checkpointing leave every gradient bit."""
    a, b = merged_grads(runs / f"{kind}_{plain}", 2), merged_grads(runs / f"{kind}_{layout}", 2)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe", "lowrank"])
def test_batched_weight_gradients_equal_the_unbatched_ones(runs, kind):
    """One GEMM over the stacked microbatches sums the same products as one GEMM per microbatch: only the
    rounding differs."""
    a, b = merged_grads(runs / f"{kind}_1f1b_2bp", 2), merged_grads(runs / f"{kind}_1f1b_2bp_batched", 2)
    assert_same_grads(a, b)


@pytest.mark.slow
def test_gpipe_2bp_gradients_bit_equal_to_gpipe(runs):
    a, b = merged_grads(runs / "dense_gpipe", 2), merged_grads(runs / "dense_gpipe_2bp", 2)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def probe(runs: Path, kind: str, layout: str, rank: int) -> dict:
    return json.loads(Path(f"{runs}/probe_{kind}_{layout}.rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind, layout", [("dense", "1f1b_2bp"), ("moe", "1f1b_2bp"), ("lowrank", "1f1b_2bp"),
                                          ("dense", "1f1b_2bp_recompute")])
def test_input_backward_leaves_every_parameter_grad_untouched(runs, kind, layout):
    for rank in (0, 1):
        result = probe(runs, kind, layout, rank)
        assert result["inputs_checked"] == 4 and result["changed"] == []


@pytest.mark.slow
def test_batched_weight_gradients_leave_the_input_backward_alone(runs):
    """With pp_batch_weight_grads the input backward still changes no .grad and does exactly the input-gradient
    work of the unbatched split (the low-rank factors' GEMMs wait for the batched W too)."""
    for rank in (0, 1):
        plain, batched = probe(runs, "lowrank", "1f1b_2bp", rank), probe(runs, "lowrank", "1f1b_2bp_batched", rank)
        assert batched["inputs_checked"] == 4 and batched["changed"] == []
        assert batched["flops"]["F"] == plain["flops"]["F"] and batched["flops"]["I"] == plain["flops"]["I"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "moe", "lowrank"])
def test_weight_gemms_run_only_in_the_weight_backward(runs, kind):
    """On both stages the input backward does only the input-gradient matmuls: I + W costs exactly the FLOPs
    of the full backward B, and each is a large share of it (no weight GEMM ran twice, none ran early; the
    first stage's I runs down to its embedding output)."""
    for rank in (0, 1):
        whole, split = probe(runs, kind, "1f1b", rank)["flops"], probe(runs, kind, "1f1b_2bp", rank)["flops"]
        assert split["F"] == whole["F"]
        assert split["I"] + split["W"] == whole["B"]
        assert split["I"] >= 0.3 * whole["B"] and split["W"] >= 0.3 * whole["B"]


@pytest.mark.slow
def test_checkpointed_blocks_recompute_once_in_the_input_backward_and_are_freed(runs):
    """2BP with full checkpointing: I recomputes each block once, as 1F1B's B does (I + W costs what that B
    costs), W recomputes nothing (it costs what it costs without checkpointing), and once the step is done no
    checkpointed forward holds recomputed activations."""
    for rank in (0, 1):
        whole = probe(runs, "dense", "1f1b_recompute", rank)["flops"]
        plain = probe(runs, "dense", "1f1b_2bp", rank)["flops"]
        result = probe(runs, "dense", "1f1b_2bp_recompute", rank)
        split = result["flops"]
        assert split["F"] == whole["F"] == plain["F"]
        assert split["I"] + split["W"] == whole["B"]
        assert split["W"] == plain["W"] and split["I"] > plain["I"]
        assert result["checkpointed_forwards_alive"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind, layout", RESUMED)
def test_pp2_checkpoint_resumes_at_pp1_with_equal_next_loss(runs, kind, layout):
    a, b = losses(runs / f"ref_{kind}"), losses(runs / f"resume_{kind}_{layout}")
    assert sorted(b) == [4] and b[4] == pytest.approx(a[4], rel=1e-5)


@pytest.mark.slow
def test_single_process_checkpoint_resumes_at_pp2_and_evaluates_alike(runs):
    a, b = losses(runs / "ref_dense"), losses(runs / "dense_from_single")
    assert sorted(b) == [4] and b[4] == pytest.approx(a[4], rel=1e-5)
    val = [[r["val_loss"] for r in records(runs / run) if "val_loss" in r] for run in ("ref_dense", "dense_from_single")]
    assert val[1] == pytest.approx(val[0], rel=1e-5)  # the pipelined forward-only evaluation at step 4


@pytest.mark.slow
@pytest.mark.parametrize("layout", SAMPLED)
def test_pp2_samples_the_single_process_text_on_every_rank(runs, layout):
    """End-of-run sampling under pp (the stages forward token by token, the last stage's logits sent to every
    rank): from the same weights and seed every rank draws the text the single-process model draws."""
    ref = (runs / "ref_dense.sample").read_text()
    assert ref.startswith(PROMPT) and len(ref) > len(PROMPT)
    for rank in range(LAYOUTS[layout][0]):
        assert (runs / f"sample_{layout}.rank{rank}.txt").read_text() == ref


@pytest.mark.slow
def test_trainer_logs_measured_bubble_and_peak_memory_per_rank(runs):
    rec = [r for r in records(runs / "dense_1f1b") if "loss" in r][-1]
    for rank in (0, 1):
        assert 0.0 <= rec[f"pp/bubble_fraction/rank{rank}"] < 1.0
        assert rec[f"pp/peak_memory_mb/rank{rank}"] > 0
    assert rec["pp/f_ms"] > 0 and rec["pp/b_ms"] > 0
    split = [r for r in records(runs / "dense_1f1b_2bp") if "loss" in r][-1]
    assert split["pp/i_ms"] > 0 and split["pp/w_ms"] > 0


# ---- the split and the schedules, without processes ---------------------------------------------------


def cfg(*overrides: str):
    return load_config(None, ["model.vocab_size=64", "model.num_layers=8", *overrides])


def test_cost_model_counts_embedding_and_head():
    small = stage_blocks(cfg("parallel.pp=2"))
    assert [len(s) for s in small] == [4, 4]  # a tiny vocabulary: blocks dominate, an even split
    big = cfg("parallel.pp=2", "model.vocab_size=65536")  # the head costs more than two blocks
    embed, blocks, head = stage_costs(big)
    assert head > 2 * blocks[0] and embed > 0
    counts = [len(s) for s in stage_blocks(big)]
    assert sum(counts) == 8 and counts[1] < counts[0]
    assert balance(0.0, [1.0] * 7, 0.0, 3) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])


def test_stages_of_one_rank_are_balanced_together():
    """Under a V schedule rank 0 runs the first and the last stage (embedding and head): the blocks go where
    the summed load per rank is lowest, never worse than balancing each stage alone, and close to the best
    contiguous split found by brute force."""
    from itertools import combinations

    from pretrain.parallel.stages import _stage_costs

    def max_rank_load(counts, embed, blocks, head, ranks):
        loads: dict[int, float] = {}
        for stage, c in enumerate(_stage_costs(counts, embed, blocks, head)):
            loads[ranks[stage]] = loads.get(ranks[stage], 0.0) + c
        return max(loads.values())

    ranks = [0, 1, 1, 0]  # zbv at pp 2
    per_stage, per_rank = balance(0.5, [1.0] * 8, 3.0, 4), balance(0.5, [1.0] * 8, 3.0, 4, ranks)
    assert max_rank_load(per_stage, 0.5, [1.0] * 8, 3.0, ranks) == 6.5  # the head stage alone gets 1 block
    assert max_rank_load(per_rank, 0.5, [1.0] * 8, 3.0, ranks) == 6.0  # rank 0: 2 blocks, rank 1: 6
    rng = torch.Generator().manual_seed(0)
    for trial in range(60):
        pp, name = (2, "zbv") if trial % 2 else (3, "interleaved_1f1b")
        ranks = [schedules.stage_ranks(name, pp, 2)[s] for s in range(2 * pp)]
        n = 2 * pp + int(torch.randint(0, 6, (), generator=rng))
        embed, head = (float(v) for v in torch.rand(2, generator=rng) * torch.tensor([2.0, 5.0]))
        blocks = (1.0 + 0.2 * torch.rand(n, generator=rng)).tolist()
        got = max_rank_load(balance(embed, blocks, head, 2 * pp, ranks), embed, blocks, head, ranks)
        assert got <= max_rank_load(balance(embed, blocks, head, 2 * pp), embed, blocks, head, ranks)
        splits = ([b - a for a, b in zip((0, *cuts), (*cuts, n), strict=True)]
                  for cuts in combinations(range(1, n), 2 * pp - 1))
        assert got <= 1.05 * min(max_rank_load(c, embed, blocks, head, ranks) for c in splits)


def test_explicit_layout_places_every_block_once():
    layout = stage_blocks(cfg("parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=2",
                              "parallel.pp_layout=[1, 3, 3, 1]"))
    assert layout == [["0"], ["1", "2", "3"], ["4", "5", "6"], ["7"]]
    with pytest.raises(ConfigError, match="parallel.pp_layout"):
        cfg("parallel.pp=2", "parallel.pp_layout=[4, 3]")


@pytest.mark.parametrize("overrides, key", [
    (["parallel.pp_schedule=zbv"], "parallel.pp_schedule"),  # needs pp_virtual=2
    (["parallel.pp_schedule=1f1b", "parallel.pp_virtual=2"], "parallel.pp_schedule"),
    (["parallel.pp_schedule=dualpipev", "parallel.pp_virtual=2", "data.global_batch_size=8",
      "data.micro_batch_size=4"], "parallel.pp_schedule"),  # 2 microbatches for 4 stages
    (["parallel.pp_batch_weight_grads=true"], "parallel.pp_batch_weight_grads"),  # 1f1b has no W
    (["parallel.pp_schedule=zbv", "parallel.pp_virtual=2", "parallel.dp_shard=2", "model.tie_embeddings=true",
      "optim.impl=foreach"], "optim.impl"),  # the tied weight, whole on rank 0, is no DTensor like the others
    (["parallel.pp_schedule=1f1b_2bp", "parallel.pp_batch_weight_grads=true", "train.activation_checkpointing=full"],
     "parallel.pp_batch_weight_grads"),  # keeps the linear inputs that checkpointing drops
])
def test_impossible_pipeline_configs_fail_at_load(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg("parallel.pp=2", *overrides)


def kinds(actions) -> str:
    return "".join(f"{a.computation_type.value}{a.microbatch_index}" for a in actions)


def test_2bp_orders_follow_the_paper():
    gpipe = schedules.compute_order("gpipe_2bp", 2, 3)
    assert kinds(gpipe[0]) == "F0F1F2I0I1I2W0W1W2"
    order = schedules.compute_order("1f1b_2bp", 4, 6)
    assert kinds(order[0]) == "F0F1F2F3I0F4I1F5I2I3W0I4W1I5W2W3W4W5"  # 3 cool-down Is, each followed by a W
    assert kinds(order[3]) == "F0I0F1I1F2I2F3I3F4I4F5I5W0W1W2W3W4W5"  # no cool-down: every W at the end
    whole = schedules.compute_order("1f1b", 4, 6)
    assert kinds(whole[0]).replace("B", "I") == kinds(a for a in order[0] if a.computation_type.value != "W")


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 8)])
def test_simulated_1f1b_bubble_is_the_textbook_one(pp, m):
    timeline = schedules.simulate(schedules.compute_order("1f1b", pp, m), pp, {"F": 1.0, "I": 1.0, "W": 1.0})
    assert timeline.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1))
    assert timeline.peak_activations == {r: pp - r for r in range(pp)}  # 1F1B holds pp - rank microbatches


def test_split_backward_shrinks_the_simulated_bubble():
    cost = {"F": 1.0, "I": 1.0, "W": 1.0}
    bubble = {name: schedules.simulate(schedules.compute_order(name, 4, 8, VIRTUAL[name]),
                                       4 * schedules.stages_per_rank(name, VIRTUAL[name]), cost).bubble_fraction
              for name in VIRTUAL}
    assert bubble["1f1b_2bp"] < bubble["1f1b"] and bubble["gpipe_2bp"] < bubble["gpipe"]
    assert bubble["zbv"] < bubble["interleaved_1f1b"] < bubble["1f1b"]


def test_batched_weight_gradient_is_one_gemm_over_the_microbatches():
    """Every parameter that reaches the forward only through F.linear (nn.Linear, both low-rank factors, a
    weight used twice) gets dW = [dy_1; ...; dy_k]^T [x_1; ...; x_k] after input backwards that computed no
    weight gradient; a parameter used otherwise too (here indexed) is left to autograd's weight backward."""
    from pretrain.models.structured import LowRankLinear
    from pretrain.parallel.weight_grads import LinearWeightGrads

    torch.manual_seed(0)
    lowrank, twice, indexed = LowRankLinear(8, 16, 4), torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 4)
    params = [lowrank.V, lowrank.U, twice.weight, indexed.weight, indexed.bias]
    for p in params:
        torch.nn.init.normal_(p, std=0.3)

    def forward(x):
        h = twice(twice(torch.nn.functional.gelu(lowrank(x))))
        return indexed(h) * indexed.weight[0, 0]

    grads = LinearWeightGrads()
    xs = [torch.randn(2, 3, 8, requires_grad=True) for _ in range(3)]
    outputs = []
    for m, x in enumerate(xs):
        with grads.forward(m):
            outputs.append(forward(x))
    batched = {id(lowrank.V), id(lowrank.U), id(twice.weight)}
    for m, (x, y) in enumerate(zip(xs, outputs, strict=True)):  # the input backward: dy is caught, no dW computed
        assert grads.batched(m) == batched
        with grads.input_backward(m):
            torch.autograd.grad(y.square().sum(), x, retain_graph=True)
    assert all(p.grad is None for p in params)
    grads.run([0, 1, 2])
    assert indexed.weight.grad is None and indexed.bias.grad is None and not grads.calls
    expected = torch.autograd.grad(sum(y.square().sum() for y in outputs), params[:3])
    for p, g in zip(params[:3], expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_consecutive_weight_actions_merge_into_one():
    from types import SimpleNamespace

    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    from pretrain.parallel.pipeline import merge_weight_actions

    stages = [SimpleNamespace(num_stages=2, group_size=2, group_rank=0, submod=None, stage_index=0)]
    runtime = _PipelineScheduleRuntime(stages, 4)
    runtime._prepare_schedule_with_comms(schedules.compute_order("1f1b_2bp", 2, 4))
    merged = merge_weight_actions(runtime.pipeline_order_with_comms[1])
    weights = [a for a in merged if a.computation_type.value == "W"]
    assert len(weights) == 1 and [a.microbatch_index for a in weights[0].sub_actions] == [0, 1, 2, 3]
    assert [a for a in merged if a.computation_type.value != "W"] == [
        a for a in runtime.pipeline_order_with_comms[1] if a.computation_type.value != "W"]


def test_schedule_tool_draws_the_timeline_and_prints_bubble_and_peak(tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "timeline.png"
    result = run_cli("schedule", "--pp", "4", "--microbatches", "8", "--schedule", "zbv", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "bubble fraction   0.059" in result.stdout
    assert "peak activations  rank 0: 8, rank 1: 8, rank 2: 8, rank 3: 8" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("schedule", "--pp", "2", "--microbatches", "2", "--schedule", "dualpipev")
    assert bad.returncode == 2 and "dualpipev cannot run 2 microbatches" in bad.stderr


@pytest.mark.slow
def test_schedule_tool_replays_the_measured_action_times(runs):
    from pretrain.schedule_tool import run_schedule_tool

    lines: list[str] = []
    run_schedule_tool("1f1b_2bp", 2, 4, None, None, str(runs / "dense_1f1b_2bp"), None, log=lines.append)
    rec = [r for r in records(runs / "dense_1f1b_2bp") if "pp/f_ms" in r][-1]
    assert f"costs F {rec['pp/f_ms']:.3g}, I {rec['pp/i_ms']:.3g}, W {rec['pp/w_ms']:.3g}" in lines[0]
