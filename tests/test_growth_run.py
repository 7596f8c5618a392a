"""Growth of checkpoints (``pretrain grow``): the grown run continues the data and the token and FLOP accounts of
the small one, a checkpoint written under tensor or pipeline parallelism grows into the same weights as one
written by a single process, AdamW moments can follow copied weights, and the plan prints the timing rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pretrain
from pretrain.config import load_config
from pretrain.growth.offline import GrowthSpec, grow_checkpoint
from pretrain.growth.operators import depth_map
from pretrain.train import checkpoint
from tests.conftest import TINY, launch_jobs, run_cli

STEPS = ["train.max_steps=4", "train.eval_interval=0", "checkpoint.interval=4", "train.log_interval=1",
         "optim.warmup_steps=1"]


def quiet(*_a, **_k):
    pass


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grown_run_continues_the_data_tokens_and_flops(tiny_overrides, tmp_path):
    small = tmp_path / "run"
    common = ["configs/quickstart.yaml", *tiny_overrides, *STEPS]
    assert run_cli("train", *common).returncode == 0
    grown_dir = tmp_path / "grown"
    result = run_cli("grow", str(small), str(grown_dir), "--op", "stack", "--factor", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pretrain train {grown_dir}/config.yaml" in result.stdout
    before, after = pretrain.load_model(small).state_dict(), pretrain.load_model(grown_dir).state_dict()
    order = depth_map("stack", 2, 4)
    for name, tensor in after.items():
        key = name if not name.startswith("blocks.") else f"blocks.{order[int(name.split('.')[1])]}.{name.split('.', 2)[2]}"
        assert torch.equal(tensor, before[key]), name
    trained = run_cli("train", str(grown_dir / "config.yaml"), "train.max_steps=3", "train.log_interval=1")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "compute by stage:" in trained.stdout and "then grown by stack" in trained.stdout
    small_steps = [r for r in records(small) if "loss" in r]
    grown_steps = [r for r in records(grown_dir) if "loss" in r]
    gbs = load_config(None, TINY).data.global_batch_size
    assert [r["consumed_samples"] for r in grown_steps] == [small_steps[-1]["consumed_samples"] + gbs * k
                                                            for k in (1, 2, 3)]  # no sample repeated or skipped
    assert grown_steps[0]["tokens"] == small_steps[-1]["tokens"] + gbs * 64
    flops_per_step = grown_steps[1]["flops"] - grown_steps[0]["flops"]
    assert grown_steps[0]["flops"] == pytest.approx(small_steps[-1]["flops"] + flops_per_step)
    assert flops_per_step > 1.5 * (small_steps[1]["flops"] - small_steps[0]["flops"])  # the bigger model's
    assert all(r["loss"] == r["loss"] for r in grown_steps)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, shared_cache):
    """Two steps of the same tiny model under tp2 and under pp2 (one launch), each checkpointed."""
    tmp = tmp_path_factory.mktemp("grow_layouts")
    base = TINY + [f"tokenizer.path={shared_cache}/tok.model", f"data.prefix={shared_cache}/corpus",
                   "train.max_steps=2", "checkpoint.interval=2", "train.eval_interval=0"]
    jobs = [{"overrides": base + layout + [f"train.run_dir={tmp}/{name}"]}
            for name, layout in {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}.items()]
    launch_jobs("dist_worker.py", 2, jobs, tmp, port=29640)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_growth_from_a_parallel_checkpoint_equals_growth_from_one_process(layouts, tmp_path, layout):
    """The layout's checkpoint, and the same weights written again by one process, grow into the same tensors."""
    from pretrain.train.optim import build_optimizer

    source = layouts / layout / "checkpoints" / "step_0000002"
    cfg = load_config(source / "config.yaml", ["parallel.tp=1", "parallel.pp=1"])
    model = pretrain.load_model(source)  # resharded from the layout's shards
    optimizer = build_optimizer(model, cfg.optim)
    one = checkpoint.save(tmp_path / "one" / "checkpoints", 2, lambda d: checkpoint.save_dcp(d, model, optimizer),
                          checkpoint.read_state(source), cfg.to_yaml(), keep=1)
    spec = GrowthSpec("interpolate", num_layers=5)
    for name, src in (("from_layout", source), ("from_one", one)):
        grow_checkpoint(src, tmp_path / name, spec, log=quiet)
    a = pretrain.load_model(tmp_path / "from_layout").state_dict()
    b = pretrain.load_model(tmp_path / "from_one").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_growth_under_torchrun_reads_shards_and_equals_one_process(layouts, tmp_path):
    """`torchrun -m pretrain grow` builds the grown model under the target's layout (here tp2, from a pp2 checkpoint)
    and every rank reads only its shards: the same tensors as growth in one process."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    source = layouts / "pp2" / "checkpoints" / "step_0000002"
    target = load_config(source / "config.yaml", ["parallel.pp=1", "parallel.tp=2", "model.num_layers=5"])
    (tmp_path / "target.yaml").write_text(target.to_yaml())
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "pretrain", "grow", str(source), str(tmp_path / "sharded"), "--op", "interpolate",
                             "--num-layers", "5", "--config", str(tmp_path / "target.yaml")], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes, each holding its shards" in result.stdout
    grow_checkpoint(source, tmp_path / "one", GrowthSpec("interpolate", num_layers=5), log=quiet)
    a = pretrain.load_model(tmp_path / "sharded").state_dict()
    b = pretrain.load_model(tmp_path / "one").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_config(tmp_path / "sharded" / "config.yaml").parallel.tp == 2


@pytest.mark.slow
@pytest.mark.parametrize("op,args,layout", [
    ("width", ["--hidden-factor", "2", "--ffn-size", "192"], ["parallel.tp=2"]),
    ("upcycle", ["--experts", "4", "--top-k", "2"], ["parallel.dp_shard=2", "parallel.ep=2"]),
])
def test_width_and_upcycling_under_torchrun_equal_one_process(layouts, tmp_path, op, args, layout):
    """Width growth (into tp2) and upcycling (into ep2 over dp_shard2) from a pp2 checkpoint under torchrun: every
    rank grows one tensor at a time and keeps its shard; the same tensors as growth in one process."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    source = layouts / "pp2" / "checkpoints" / "step_0000002"
    grow_checkpoint(source, tmp_path / "one", _spec(op, args), log=quiet)
    grown = load_config(tmp_path / "one" / "config.yaml", ["parallel.pp=1", *layout])
    (tmp_path / "target.yaml").write_text(grown.to_yaml())
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "pretrain", "grow", str(source), str(tmp_path / "sharded"), "--op", op, *args,
                             "--config", str(tmp_path / "target.yaml")], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes, each holding its shards" in result.stdout
    a = pretrain.load_model(tmp_path / "sharded").state_dict()
    b = pretrain.load_model(tmp_path / "one").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _spec(op: str, args: list[str]) -> GrowthSpec:
    from pretrain.config import MoEConfig

    if op == "width":
        return GrowthSpec("width", hidden_factor=int(args[1]), ffn_size=int(args[3]))
    return GrowthSpec("upcycle", moe=MoEConfig(num_experts=int(args[1]), top_k=int(args[3])))


@pytest.mark.slow
def test_carried_moments_follow_the_copied_weights(tiny_cfg, tmp_path):
    from pretrain.models.transformer import build_model
    from pretrain.train.optim import build_optimizer
    from pretrain.train.trainer import run_training

    cfg = tiny_cfg(*STEPS)
    run_training(cfg, log=quiet)
    grow_checkpoint(cfg.train.run_dir, tmp_path / "grown", GrowthSpec("stack", factor=2), carry_optimizer=True,
                    log=quiet)

    def moments(run: Path) -> dict:
        step = checkpoint.resolve(run)
        run_cfg = load_config(step / "config.yaml")
        model = build_model(run_cfg.model, 0)
        optimizer = build_optimizer(model, run_cfg.optim)
        checkpoint.load_dcp(step, model, optimizer, no_dist=True)
        return {n: optimizer.state[p]["exp_avg"] for n, p in model.named_parameters() if p in optimizer.state}

    small, grown = moments(Path(cfg.train.run_dir)), moments(tmp_path / "grown")
    assert torch.equal(grown["blocks.3.attn.q_proj.weight"], small["blocks.1.attn.q_proj.weight"])
    assert torch.equal(grown["embed.weight"], small["embed.weight"])


def test_growth_refusals_name_the_fix(tiny_cfg, tmp_path):
    from pretrain.errors import UserError
    from pretrain.train.trainer import run_training

    cfg = tiny_cfg(*STEPS)
    run_training(cfg, log=quiet)
    with pytest.raises(UserError, match="needs the experts"):
        grow_checkpoint(cfg.train.run_dir, tmp_path / "g1", GrowthSpec("upcycle"), log=quiet)
    (tmp_path / "target.yaml").write_text("model:\n  num_layers: 3\n")
    with pytest.raises(UserError, match="model.num_layers"):
        grow_checkpoint(cfg.train.run_dir, tmp_path / "g2", GrowthSpec("stack", factor=2),
                        target_config=tmp_path / "target.yaml", log=quiet)
    with pytest.raises(UserError, match="already holds a run"):
        grow_checkpoint(cfg.train.run_dir, cfg.train.run_dir, GrowthSpec("stack", factor=2), log=quiet)


def test_plan_prints_the_rule(capsys):
    from pretrain.cli import main

    assert main(["grow", "--plan", "--target-params", "7e9", "--tokens", "2e12"]) == 0
    out = capsys.readouterr().out
    assert "grow after 11.1B tokens" in out
