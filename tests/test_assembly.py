"""Model assembly (``assembly:``, ``pretrain assemble``): the meta model, incubations that train only their module
inside the frozen meta model (under any layout, at the same time in separate processes), the join that assembles
the modules' own tensors and fine-tunes, and the mistakes a user can make on the way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pretrain.assembly import hybrid, phases
from pretrain.config import ConfigError, load_config
from pretrain.train.trainer import Trainer, run_training
from tests.conftest import REPO, TINY, run_cli

# 4 blocks in 2 modules; the meta model and each incubation train 6 steps, the join 8.
STEPS = ["model.num_layers=4", "train.max_steps=8", "train.eval_interval=4", "checkpoint.interval=4",
         "train.log_interval=1", "optim.warmup_steps=1", "assembly.modules=2", "assembly.meta_steps=6",
         "assembly.incubation_steps=6"]
QUIET = {"log": lambda *a, **k: None}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def cli(capsys, *argv: str) -> tuple[int, str]:
    """`pretrain ARGV` in this process: (exit code, what it printed to stderr)."""
    from pretrain.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def pretrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", *args]


@pytest.fixture(scope="module")
def base(shared_cache) -> list[str]:
    return TINY + [f"tokenizer.path={shared_cache}/tok.model", f"data.prefix={shared_cache}/corpus", *STEPS]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("assembly_cfg") / "assembled.yaml"
    path.write_text("assembly:\n  modules: 2\n")
    return path


@pytest.fixture(scope="module")
def assembled(tmp_path_factory, base, config_file) -> Path:
    """A whole assembled run by `pretrain assemble run --parallel 2`: the meta model, the two incubations at the same
    time as two separate processes, then the join."""
    root = tmp_path_factory.mktemp("assembled") / "run"
    result = run_cli("assemble", "run", str(config_file), *base, f"train.run_dir={root}", "--parallel", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (root / "run.out").write_text(result.stdout)
    return root


def target_tensors(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, read by torch's own DCP converter (not by our loader)."""
    out = tmp / f"{step_dir.parent.parent.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return {k.removeprefix("model."): v for k, v in torch.load(out, weights_only=True)["model"].items()}


# ---- the split, the hybrid network, the phases' configs ---------------------------------------------------------
def test_modules_split_the_blocks_and_own_the_ends(tiny_cfg):
    cfg = tiny_cfg("model.num_layers=7", "assembly.modules=3")
    assert cfg.assembly.blocks(7) == [3, 2, 2] and cfg.assembly.starts(7) == [0, 3, 5, 7]
    assert hybrid.hybrid_layout(cfg, 2) == [("meta", 0), ("module", 3), ("module", 4), ("meta", 2)]
    assert hybrid.target_name(cfg, 2, "blocks.2.attn.wo.weight") == "blocks.4.attn.wo.weight"
    assert hybrid.checkpoint_name(cfg, 2, "blocks.0.attn.wo.weight") is None  # a frozen meta block
    assert [hybrid.owner(cfg, f"blocks.{b}.x") for b in range(7)] == [1, 1, 1, 2, 2, 3, 3]
    assert (hybrid.owner(cfg, "embed.weight"), hybrid.owner(cfg, "head.weight"), hybrid.owner(cfg, "norm.weight")) == (
        1, 3, 3)
    cfg = tiny_cfg("model.num_layers=7", "assembly.modules=3", "assembly.module_blocks=[1,1,5]",
                   "assembly.head_module=1")
    assert cfg.assembly.starts(7) == [0, 1, 2, 7] and hybrid.owner(cfg, "head.weight") == 1


def test_phase_configs(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*STEPS, f"train.run_dir={tmp_path}/run")
    meta = phases.phase_config(cfg, "meta")
    assert (meta.model.num_layers, meta.train.max_steps, meta.assembly.modules) == (2, 6, 0)
    assert meta.train.run_dir == f"{tmp_path}/run/meta"
    inc = phases.phase_config(cfg, "incubate", 2)
    assert (inc.model.num_layers, inc.train.max_steps, inc.assembly.phase, inc.assembly.module) == (4, 6, "incubate", 2)
    assert phases.root_of(inc) == tmp_path / "run"
    join = phases.phase_config(cfg, "join")
    assert (join.train.max_steps, join.train.run_dir) == (8, f"{tmp_path}/run/join")
    with pytest.raises(ConfigError, match="assembly.phase"):
        phases.phase_config(join, "join")  # a phase's config is not the one the user wrote


def test_meta_model_may_have_no_block_of_a_placed_kind(tiny_cfg):
    """An MoE every 4th block, or a structured FFN from block 3 on, is a real choice for the assembled model even
    though the meta model (one block per module) has no such block: its phases are accepted."""
    for placed in (["model.moe.num_experts=4", "model.moe.every_n=4"],
                   ["model.ffn.kind=lowrank", "model.ffn.rank=16", "model.ffn.dense_blocks=2"]):
        cfg = tiny_cfg(*STEPS, "model.num_layers=8", "assembly.modules=2", *placed)
        assert phases.phase_config(cfg, "meta").model.num_layers == 2
        assert phases.phase_config(cfg, "join").model.num_layers == 8


@pytest.mark.parametrize("override, key", [
    ("assembly.modules=5", "assembly.modules"),  # more modules than blocks
    ("assembly.module_blocks=[1,2]", "assembly.module_blocks"),  # does not sum to num_layers
    ("assembly.module_blocks=[4,0]", "assembly.module_blocks"),
    ("assembly.head_module=3", "assembly.head_module"),
    ("assembly.phase=incubate", "assembly.module"),  # an incubation without its module
    ("model.tie_embeddings=true", "model.tie_embeddings"),  # module 1 and module 2 would both train it
])
def test_wrong_split_fails_at_load(tiny_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_cfg("model.num_layers=4", "assembly.modules=2", override)


def test_incubation_flops_count_only_what_it_computes(tiny_cfg):
    from pretrain.models.transformer import flops_per_token

    cfg = tiny_cfg(*STEPS)
    full = flops_per_token(cfg.model, cfg.data.seq_len)
    first, last = (hybrid.incubation_flops_per_token(phases.phase_config(cfg, "incubate", k)) for k in (1, 2))
    # Module 1 sends gradients through the meta block after it (no weight gradients there); module 2 has nothing
    # after it but trains the head, and the meta block before it runs forward only.
    assert 0 < first < full and 0 < last < full and first != last


# ---- the whole flow -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_assembled_run_joins_and_fine_tunes(assembled):
    join = records(assembled / "join")
    steps = [r for r in join if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["loss"] == r["loss"] for r in steps) and steps[-1]["loss"] < steps[0]["loss"]
    # The join's summary counts every phase's compute; its FLOPs start where the others ended.
    spent = [json.loads((p / "trainer_state.json").read_text()) for p in (
        phases.finished(assembled / "meta")[0], *(phases.finished(assembled / f"module_{k}")[0] for k in (1, 2)))]
    per_step = steps[1]["flops"] - steps[0]["flops"]
    assert steps[0]["flops"] == pytest.approx(sum(s["flops"] for s in spent) + per_step, rel=1e-9)
    out = (assembled / "run.out").read_text()
    assert "[join]   compute by phase:" in out and "[join] assembled 2 modules" in out
    assert "[module 1] step" in out and "[module 2] step" in out
    # The two incubations ran at once: each was still training when the other started.
    spans = [(records(assembled / f"module_{k}")[0]["time"], records(assembled / f"module_{k}")[-1]["time"])
             for k in (1, 2)]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    times = json.loads((assembled / "assembly.json").read_text())
    assert times["incubations_at_once"] == 2 and set(times["per_phase_s"]) == {"meta", "module 1", "module 2", "join"}


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_incubation_trains_only_its_module(assembled, base, tmp_path, k):
    """Module k's incubation in this process: module k starts as the target model's own initial weights; the meta
    parts keep their values bit for bit and never get a gradient; blocks before module k keep no activations for
    backward, blocks after it pass the gradient through (module 1 learns behind meta block 2); the optimizer and
    the checkpoint hold module k alone, the checkpoint under the target's names."""
    from pretrain.models.transformer import build_model

    root = tmp_path / "run"
    shutil.copytree(assembled / "meta", root / "meta")
    cfg = phases.phase_config(load_config(None, base + [f"train.run_dir={root}", "assembly.incubation_steps=3"]),
                              "incubate", k)
    trainer = Trainer(cfg, **QUIET)
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    target_init = build_model(trainer.cfg.model, cfg.train.seed).state_dict()
    for name in before:
        if hybrid.owned(cfg, k, name):
            assert torch.equal(before[name], target_init[hybrid.target_name(cfg, k, name)]), name
    kept_graph = []
    model.blocks["0"].register_forward_hook(lambda m, i, out: kept_graph.append(out.requires_grad))
    trainer.fit()
    meta = target_tensors(phases.finished(root / "meta")[0], tmp_path)
    layout = hybrid.hybrid_layout(cfg, k)
    for name, p in model.named_parameters():
        if hybrid.owned(cfg, k, name):
            assert p.requires_grad and not torch.equal(p, before[name]), name
        else:
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, before[name]), name
            match = hybrid._BLOCK.match(name)
            meta_name = name if match is None else f"blocks.{layout[int(match.group(1))][1]}.{match.group(2)}"
            assert torch.equal(p, meta[meta_name]), name
    # Block 0 is module 1's own (a graph in every training forward) or, for module 2, frozen meta (never a graph).
    assert kept_graph and any(kept_graph) == (k == 1)
    if k == 1:
        assert layout[-1] == ("meta", 1)  # the gradient reached module 1 through this frozen block
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for name, p in model.named_parameters() if hybrid.owned(cfg, k, name)}
    saved = target_tensors(phases.finished(root / f"module_{k}")[0], tmp_path)
    assert set(saved) == {hybrid.target_name(cfg, k, n) for n, _ in model.named_parameters() if hybrid.owned(cfg, k, n)}
    blocks = sorted({".".join(n.split(".")[:2]) for n in saved if n.startswith("blocks.")})
    assert blocks == (["blocks.0", "blocks.1"] if k == 1 else ["blocks.2", "blocks.3"])
    assert ("embed.weight" in saved) == (k == 1) and ("head.weight" in saved) == (k == 2)
    for name, p in model.named_parameters():
        if hybrid.owned(cfg, k, name):
            assert torch.equal(saved[hybrid.target_name(cfg, k, name)], p), name


@pytest.mark.slow
def test_join_starts_from_the_modules_tensors(assembled, base, tmp_path):
    root = tmp_path / "run"
    for part in ("meta", "module_1", "module_2"):
        shutil.copytree(assembled / part, root / part)
    cfg = phases.phase_config(load_config(None, base + [f"train.run_dir={root}"]), "join")
    model = Trainer(cfg, **QUIET).model  # assembled, not trained yet
    state = model.state_dict()
    owners = {k: target_tensors(phases.finished(root / f"module_{k}")[0], tmp_path) for k in (1, 2)}
    assert sorted(set(owners[1]) | set(owners[2])) == sorted(state) and not set(owners[1]) & set(owners[2])
    for k, tensors in owners.items():
        for name, value in tensors.items():
            assert torch.equal(state[name], value), (k, name)


@pytest.mark.slow
def test_phases_run_under_other_layouts(assembled, base, config_file, tmp_path):
    """Module 2 incubated under FSDP2 and the join pipelined over 2 ranks give the single-process losses."""
    root = tmp_path / "run"
    for part in ("meta", "module_1"):
        shutil.copytree(assembled / part, root / part)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pretrain"]
    args = [str(config_file), *base, f"train.run_dir={root}"]
    for phase, extra in [("incubate", ["--module", "2", "parallel.dp_shard=2"]), ("join", ["parallel.pp=2"])]:
        result = subprocess.run([*torchrun, "assemble", phase, *args, *extra], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    for part in ("module_2", "join"):
        got, expected = losses(root / part), losses(assembled / part)
        assert sorted(got) == sorted(expected)
        assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)], abs=1e-5), part


# ---- mistakes -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_join_names_a_missing_or_foreign_module(assembled, base, config_file, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(assembled / "meta", root / "meta")
    shutil.copytree(assembled / "module_1", root / "module_1")
    args = [str(config_file), *base, f"train.run_dir={root}"]
    code, err = cli(capsys, "assemble", "join", *args)
    assert code == 2 and "module 2 is missing" in err and str(root / "module_2") in err
    shutil.copytree(assembled / "module_1", root / "module_2")  # module 1's checkpoint where module 2's belongs
    code, err = cli(capsys, "assemble", "join", *args)
    assert code == 2 and "module 2's checkpoint" in err and "not module 2's incubation" in err
    assert str(root / "module_2") in err
    shutil.rmtree(root / "module_2")
    shutil.copytree(assembled / "module_2", root / "module_2")
    saved = phases.finished(root / "module_2")[0] / "config.yaml"  # as if incubated for a narrower FFN
    original = saved.read_text()
    saved.write_text(original.replace("ffn_hidden_size: 128", "ffn_hidden_size: 96"))
    code, err = cli(capsys, "assemble", "join", *args)
    assert code == 2 and "module 2's checkpoint" in err and "model.ffn_hidden_size 96 there, 128 here" in err
    assert str(saved.parent) in err
    saved.write_text(original)
    shutil.rmtree(phases.finished(root / "module_2")[0])  # only its step-4 checkpoint is left: unfinished
    code, err = cli(capsys, "assemble", "join", *args)
    assert code == 2 and "stopped at step 4 of 6" in err
    assert not (root / "join" / "checkpoints").exists() or not list((root / "join" / "checkpoints").iterdir())


def test_assemble_mistakes_exit_2_with_the_fix(base, config_file, tmp_path, capsys):
    args = [str(config_file), *base, f"train.run_dir={tmp_path}/run"]
    cases = [
        (["train", *args], "pretrain assemble run"),  # an assembled config trained end to end
        (["assemble", "incubate", *args, "--module", "2"], "pretrain assemble meta"),  # no meta model yet
        (["assemble", "incubate", *args, "--module", "3"], "1 to 2"),
        (["assemble", "incubate", *args], "needs --module"),
        (["assemble", "meta", str(config_file), *base, "assembly.modules=0"], "assembly.modules"),
        (["config", str(config_file), *base, "assembly.module_blocks=[3,3]"], "assembly.module_blocks"),
        (["assemble", "run", *args, "--parallel", "0"], "--parallel 0"),
        (["assemble", "check", *args, "assembly.modules=5"], "assembly.modules"),
    ]
    for argv, fix in cases:
        code, err = cli(capsys, *argv)
        assert code == 2 and fix in err and "Traceback" not in err, (argv, err)
    from pretrain.cli import main

    capsys.readouterr()
    assert main(["assemble", "check", *args]) == 0 and capsys.readouterr().out.strip() == "2"  # K, for the scripts
    result = run_cli(*cases[1][0])  # and as a user runs it
    assert result.returncode == 2 and cases[1][1] in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_incubation_checkpoint_is_not_a_model(assembled, capsys):
    code, err = cli(capsys, "export", str(assembled / "module_1"), str(assembled / "hf_module_1"))
    assert code == 2 and "holds that module alone" in err and "pretrain assemble join" in err


@pytest.mark.slow
def test_assemble_run_skips_finished_phases(assembled, base, config_file, tmp_path):
    """`pretrain assemble run` again after the meta model and both modules are done: it only joins."""
    root = tmp_path / "run"
    for part in ("meta", "module_1", "module_2"):
        shutil.copytree(assembled / part, root / part)
    result = run_cli("assemble", "run", str(config_file), *base, f"train.run_dir={root}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "meta model: finished" in result.stdout and "module 2: finished" in result.stdout
    assert "[join]" in result.stdout and "[module 1]" not in result.stdout and "[meta]" not in result.stdout
    assert losses(root / "join") == pytest.approx(losses(assembled / "join"), abs=1e-6)
    assert "meta_s" not in json.loads((root / "assembly.json").read_text())



@pytest.mark.slow
def test_interrupted_incubation_resumes_exactly(assembled, base, tmp_path):
    """An incubation stopped after its step-4 checkpoint continues with the uninterrupted one's losses (its
    checkpoint holds module 1 and its optimizer state; the frozen meta parts come from the meta model again)."""
    root = tmp_path / "run"
    shutil.copytree(assembled / "meta", root / "meta")
    cfg = load_config(None, base + [f"train.run_dir={root}"])
    run_training(phases.phase_config(cfg, "incubate", 1).replace(train={"stop_at_step": 4}), **QUIET)
    assert sorted(losses(root / "module_1")) == [1, 2, 3, 4]
    run_training(phases.phase_config(cfg, "incubate", 1), **QUIET)
    assert losses(root / "module_1") == losses(assembled / "module_1")
