"""The model-zoo methods inside the trainer: self-guided schedule, depth diagnostics, every shipped config."""

import json
import math
from pathlib import Path

import pytest
import torch

import pretrain
from pretrain.config import ModelConfig, load_config
from pretrain.models.structured import SelfGuided, alpha_at, premerge
from pretrain.models.transformer import build_model, num_params
from pretrain.train.trainer import Trainer, run_training

REPO = Path(__file__).resolve().parents[1]
SGT = ["model.ffn.kind=lowrank", "model.ffn.rank=16", "model.ffn.self_guided.enabled=true"]


def quiet(*_a, **_k):
    pass


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def guided(model) -> list[SelfGuided]:
    return [m for m in model.modules() if isinstance(m, SelfGuided)]


def test_self_guided_alpha_decays_per_step_then_guides_leave_model_and_optimizer(tiny_cfg):
    cfg = tiny_cfg(*SGT, "model.ffn.self_guided.guided_steps=6", "train.max_steps=10")
    trainer = Trainer(cfg, log=quiet)
    layers = guided(trainer.model)
    assert len(layers) == 3 * 1  # block 0 stays dense; block 1 has gate, up and down projections
    guides = {id(layer.guide) for layer in layers}
    assert guides <= {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainer.fit()
    alphas = {r["step"]: r["sgt_alpha"] for r in records(cfg.train.run_dir) if "sgt_alpha" in r}
    for step in range(1, 7):
        assert alphas[step] == pytest.approx(alpha_at(step - 1, 6))
    assert alphas[1] == 1.0 and alphas[7] == 0.0
    assert not any(layer.has_guide for layer in layers)
    assert not [n for n, _ in trainer.model.named_parameters() if "guide" in n]
    in_optimizer = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == len(list(trainer.model.parameters()))
    assert not any(id(p) in guides for p in trainer.optimizer.state)


def test_self_guided_resume_across_guide_removal_is_exact(tiny_cfg, tmp_path):
    common = [*SGT, "model.ffn.self_guided.guided_steps=6", "model.ffn.self_guided.reduce_flop=true"]
    run_training(tiny_cfg(*common, f"train.run_dir={tmp_path}/a"), log=quiet)
    run_training(tiny_cfg(*common, f"train.run_dir={tmp_path}/b", "train.stop_at_step=10"), log=quiet)
    run_training(tiny_cfg(*common, f"train.run_dir={tmp_path}/b"), log=quiet)
    a = {r["step"]: r["loss"] for r in records(tmp_path / "a") if "loss" in r}
    b = {r["step"]: r["loss"] for r in records(tmp_path / "b") if "loss" in r}
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]
    # ... and across the removal itself (stop during the guided phase)
    run_training(tiny_cfg(*common, f"train.run_dir={tmp_path}/c", "train.stop_at_step=4"), log=quiet)
    # a model loaded after 4 optimizer steps holds the authors' alpha after their 4th per-step update
    assert {layer.alpha for layer in guided(pretrain.load_model(tmp_path / "c"))} == {alpha_at(4, 6)}
    run_training(tiny_cfg(*common, f"train.run_dir={tmp_path}/c"), log=quiet)
    c = {r["step"]: r["loss"] for r in records(tmp_path / "c") if "loss" in r}
    assert [a[s] for s in range(5, 21)] == [c[s] for s in range(5, 21)]


def test_same_flops_mode_extends_the_run_and_replays_the_guided_data(tiny_cfg):
    cfg = tiny_cfg(*SGT, "model.ffn.self_guided.guided_steps=3", "model.ffn.self_guided.mode=same_flops",
                   "train.max_steps=5")
    trainer = Trainer(cfg, log=quiet)
    positions = []
    read = trainer.train_batches
    trainer.train_batches = lambda position: positions.append(position) or read(position)
    result = trainer.fit()
    assert result["step"] == 8 and trainer.total_steps == 8
    assert positions == [0, 8, 16, 0, 8, 16, 24, 32]
    assert trainer.state["consumed_samples"] == 5 * 8


@pytest.mark.parametrize("kind, extra", [("lowrank", dict(rank=8)), ("blockdense", dict(rank=8, blocks=2)),
                                         ("blockshuffle", dict(blocks=4))])
def test_premerge_turns_a_structured_model_into_an_equal_dense_one(kind, extra):
    from pretrain.config import FFNConfig

    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, ffn_hidden_size=48,
                      ffn=FFNConfig(kind=kind, **extra))
    model = build_model(cfg, seed=0)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        before = model(tokens)
        merged = premerge(model)
        assert all(type(m).__name__ != "LowRankLinear" for m in merged.modules())
        torch.testing.assert_close(merged(tokens), before, rtol=1e-5, atol=1e-5)


def test_depth_diagnostics_log_grad_norms_and_angular_distances(tiny_cfg):
    cfg = tiny_cfg("logging.depth_interval=5", "train.max_steps=10")
    run_training(cfg, log=quiet)
    depth = [r for r in records(cfg.train.run_dir) if any(k.startswith("depth/") for k in r)]
    assert [r["step"] for r in depth] == [5, 10]
    for r in depth:
        for block in ("0", "1"):
            assert r[f"depth/grad_norm/{block}"] > 0
            assert 0.0 < r[f"depth/angular_distance/{block}"] < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")
                                        if not p.stem.startswith("bench")))
def test_every_shipped_config_trains_ten_steps(name, tiny_overrides, tmp_path):
    data = [o for o in tiny_overrides if o.startswith(("tokenizer.", "data.embedded", "data.prefix", "data.split",
                                                       "data.preprocess"))]
    cfg = load_config(REPO / "configs" / f"{name}.yaml",
                      [*data, "data.seq_len=64", "data.micro_batch_size=8", "data.global_batch_size=8",
                       "train.max_steps=10", "train.log_interval=1", "train.eval_interval=0",
                       "optim.warmup_steps=2", f"train.run_dir={tmp_path}/run", "checkpoint.interval=0"])
    run_training(cfg, log=quiet)
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.3, losses


@pytest.mark.parametrize("moe", [
    dict(num_experts=4, top_k=2, router="topk_softmax"),
    dict(num_experts=4, top_k=1, router="noisy_topk", num_shared_experts=1, every_n=2),
    dict(num_experts=4, top_k=1, router="hash", expert_ffn_hidden_size=24, capacity_factor=1.0),
])
@pytest.mark.parametrize("ffn", [dict(kind="dense"), dict(kind="lowrank", rank=8)])
def test_moe_parameter_count_formula(moe, ffn):
    from pretrain.config import FFNConfig, MoEConfig

    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=4, num_heads=4, ffn_hidden_size=48,
                      ffn=FFNConfig(**ffn), moe=MoEConfig(**moe))
    model = build_model(cfg, seed=0)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_moe_training_logs_expert_load_per_layer(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.0",
                   "train.max_steps=6", "train.log_interval=3")
    trainer = Trainer(cfg, log=quiet)
    trainer.fit()
    rec = [r for r in records(cfg.train.run_dir) if "loss" in r][-1]
    for layer in ("blocks_0_ffn", "blocks_1_ffn"):
        for key in ("load_cv", "dropped_fraction", "balance_loss", "z_loss", "tokens_min", "tokens_max"):
            assert math.isfinite(rec[f"moe/{layer}/{key}"])
        counts = rec[f"moe_tokens_per_expert/{layer}"]
        assert len(counts) == 4
        assert sum(counts) == pytest.approx(4 * 64 * 2 * (1 - rec[f"moe/{layer}/dropped_fraction"]))
    acc = EventAccumulator(str(Path(cfg.train.run_dir) / "tensorboard"))
    acc.Reload()
    assert "moe/blocks_0_ffn/load_cv" in acc.Tags()["scalars"]
    # the router trains (LM loss through the routing weights, plus the balance and z losses)
    router = trainer.model.blocks["0"].ffn.router.weight
    fresh = build_model(trainer.cfg.model, cfg.train.seed).blocks["0"].ffn.router.weight  # the resolved vocab
    assert not torch.equal(router, fresh)
