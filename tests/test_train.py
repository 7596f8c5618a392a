"""The trainer end to end on tiny configs: loss falls, resume is exact, logs and checkpoints are real."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pretrain
from pretrain.config import OptimConfig
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.train import checkpoint
from pretrain.train.optim import lr_at, param_groups
from pretrain.train.trainer import Trainer, run_training
from tests.conftest import run_cli


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def quiet(*_args, **_kwargs):
    pass


def test_short_run_lowers_loss_and_logs_everything(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=30")
    result = run_training(cfg, log=quiet)
    run_dir = Path(cfg.train.run_dir)
    recs = records(run_dir)
    train = [r for r in recs if "loss" in r]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    for r in train:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "mfu"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert train[-1]["tokens"] == 30 * 8 * 64
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:3]]) - 0.5
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert result["val_loss"] == vals[-1]
    saved = (run_dir / "config.yaml").read_text()
    assert "vocab_size: 640" in saved  # resolved from the 600-piece tokenizer, padded to a multiple of 64
    assert saved == (Path(result["checkpoint"]) / "config.yaml").read_text()
    # tensorboard event files hold the scalars, read back with tensorboard's own reader
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 31))
    assert acc.Scalars("loss")[-1].value == pytest.approx(train[-1]["loss"], rel=1e-6)


def test_resume_equals_uninterrupted_bitwise(tiny_cfg, tmp_path):
    whole = tiny_cfg(f"train.run_dir={tmp_path}/whole")
    run_training(whole, log=quiet)
    split = [f"train.run_dir={tmp_path}/split"]
    run_training(tiny_cfg(*split, "train.stop_at_step=10"), log=quiet)
    assert max(losses(tmp_path / "split")) == 10
    said: list[str] = []
    run_training(tiny_cfg(*split), log=lambda *a, **k: said.append(" ".join(map(str, a))))  # auto finds step 10
    assert any("resumed from" in line for line in said) and not any("other model settings" in line for line in said)
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # bitwise equal floats
    va = [r["val_loss"] for r in records(tmp_path / "whole") if "val_loss" in r]
    vb = [r["val_loss"] for r in records(tmp_path / "split") if "val_loss" in r]
    assert va[-1] == vb[-1]
    ma, mb = pretrain.load_model(tmp_path / "whole"), pretrain.load_model(tmp_path / "split")
    for (name, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    # a model key changed on resume that leaves the shapes alone: the run goes on, and says what changed
    said.clear()
    run_training(tiny_cfg(f"train.run_dir={tmp_path}/longer_rope", "model.rope_theta=20000", "train.stop_at_step=11",
                          f"train.resume={tmp_path}/split/checkpoints/step_0000010"),
                 log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("other model settings (model.rope_theta: 10000.0 -> 20000.0)" in line for line in said), said
    assert sorted(losses(tmp_path / "longer_rope")) == [11]


def test_checkpoints_are_atomic_and_pruned(tiny_cfg, tmp_path):
    cfg = tiny_cfg("checkpoint.interval=5", "checkpoint.keep=2")
    run_training(cfg, log=quiet)
    root = Path(cfg.train.run_dir) / "checkpoints"
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_0000015", "step_0000020"]
    # an interrupted save leaves a .tmp directory: auto-resume never picks it
    shutil.copytree(root / "step_0000020", root / "step_0000025.tmp")
    assert checkpoint.find_resume(root, "auto").name == "step_0000020"
    # a damaged checkpoint gives a message with the fix, and the older checkpoints stay
    for f in (root / "step_0000020").glob("*.distcp"):
        f.write_bytes(b"garbage")
    trainer_cfg = tiny_cfg(f"train.resume={root / 'step_0000020'}")
    with pytest.raises(UserError, match=r"step_0000020' is damaged: .*distcp has 7 bytes"):
        Trainer(trainer_cfg, log=quiet)
    assert (root / "step_0000015").is_dir()
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoint.find_resume(root, str(root / "nothing"))


def test_load_model_api_returns_logits(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=10")
    run_training(cfg, log=quiet)
    model = pretrain.load_model(Path(cfg.train.run_dir) / "checkpoints" / "step_0000010")
    assert not model.training
    tokens = torch.randint(0, 600, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 640)
    assert torch.equal(logits, pretrain.load_model(cfg.train.run_dir)(tokens))


def _megatron_dataset(prefix: Path, docs: list[list[int]], vocab: int) -> None:
    dtype = DType.optimal_dtype(vocab)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in docs:
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def test_trains_on_megatron_core_datasets_built_with_its_builder(tiny_cfg, tmp_path, shared_cache):
    tok = Tokenizer(shared_cache / "tok.model")  # built by the session's earlier runs or this one
    rng = np.random.default_rng(0)
    words = ["alpha beta gamma", "delta epsilon", "the model learns", "pipeline stage", "tensor parallel"]
    docs_a = [tok.encode(" ".join(rng.choice(words, 30))) + [tok.eos] for _ in range(60)]
    docs_b = [tok.encode(" ".join(rng.choice(words[::-1], 30))) + [tok.eos] for _ in range(60)]
    _megatron_dataset(tmp_path / "a", docs_a, tok.vocab_size)
    _megatron_dataset(tmp_path / "b", docs_b, tok.vocab_size)
    blend = f"data.blend=[{{path: {tmp_path}/a, weight: 3}}, {{path: {tmp_path}/b, weight: 1}}]"
    cfg = tiny_cfg(blend, "train.max_steps=15")
    run_training(cfg, log=quiet)
    train = losses(cfg.train.run_dir)
    assert train[15] < train[1] - 1.0
    # without a tokenizer the vocabulary must be given, and then training works on ids alone
    no_tok = [blend, "tokenizer.path=/nonexistent.model", f"train.run_dir={tmp_path}/ids"]
    with pytest.raises(UserError, match="model.vocab_size"):
        Trainer(tiny_cfg(*no_tok), log=quiet)
    run_training(tiny_cfg(*no_tok, "model.vocab_size=640", "train.max_steps=3"), log=quiet)
    assert sorted(losses(tmp_path / "ids")) == [1, 2, 3]


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(5, cos, 110) == pytest.approx(0.5)
    assert lr_at(10, cos, 110) == pytest.approx(1.0)
    assert lr_at(60, cos, 110) == pytest.approx(0.55)
    assert lr_at(110, cos, 110) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(80, wsd, 100) == pytest.approx(1.0)
    assert lr_at(90, wsd, 100) == pytest.approx(0.5)
    assert lr_at(100, wsd, 100) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_embeddings():
    from pretrain.config import ModelConfig
    from pretrain.models.transformer import build_model

    model = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {"embed.weight", "blocks.0.attn_norm.weight",
                                                          "blocks.0.ffn_norm.weight", "norm.weight"}
    assert "head.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.slow
def test_cli_train_end_to_end(tiny_overrides, tmp_path):
    result = run_cli("train", "configs/quickstart.yaml", *tiny_overrides, "train.max_steps=6",
                     "train.sample_prompt=The list", "train.sample_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for fragment in ("step      6/6", "tok/s", "MFU", "ETA", "val_loss", "sample: 'The list", "tensorboard --logdir"):
        assert fragment in out, fragment
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "step_0000006").is_dir()
    # a user error mid-setup: no traceback, the cause and the fix
    bad = run_cli("train", "configs/quickstart.yaml", *tiny_overrides, "data.sources=[{path: /nope/*.jsonl}]",
                  "data.prefix=" + str(tmp_path / "other"))
    assert bad.returncode == 2 and "matches no file" in bad.stderr and "Traceback" not in bad.stderr


def test_gradient_accumulation_matches_one_large_micro_batch(tiny_cfg, tmp_path):
    one = tiny_cfg(f"train.run_dir={tmp_path}/one", "data.micro_batch_size=8", "train.max_steps=3")
    four = tiny_cfg(f"train.run_dir={tmp_path}/four", "data.micro_batch_size=2", "train.max_steps=3")
    run_training(one, log=quiet)
    run_training(four, log=quiet)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    for step in (1, 2, 3):
        assert a[step] == pytest.approx(b[step], rel=1e-5)


def test_bf16_autocast_trains_with_fp32_master_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.precision=bf16", "train.max_steps=15")
    trainer = Trainer(cfg, log=quiet)
    trainer.fit()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    fp32 = tiny_cfg(f"train.run_dir={tmp_path}/fp32", "train.max_steps=15")
    run_training(fp32, log=quiet)
    a, b = losses(cfg.train.run_dir), losses(tmp_path / "fp32")
    assert a[1] == pytest.approx(b[1], rel=2e-2)  # same start within bf16 rounding
    assert a[15] < a[1] - 0.5


@pytest.mark.slow
def test_cli_tokenizer_and_preprocess_verbs(tmp_path):
    common = ["tokenizer.vocab_size=400", "tokenizer.train_sentences=5000", "data.embedded_docs=30",
              f"tokenizer.path={tmp_path}/t.model", f"data.prefix={tmp_path}/c"]
    tok = run_cli("tokenizer", "train", "configs/quickstart.yaml", *common)
    assert tok.returncode == 0, tok.stderr[-2000:]
    assert (tmp_path / "t.model").is_file() and "400-piece bpe" in tok.stdout
    pre = run_cli("preprocess", "configs/quickstart.yaml", *common)
    assert pre.returncode == 0, pre.stderr[-2000:]
    assert "preprocessed 30 documents" in pre.stdout
    digest = Tokenizer(tmp_path / "t.model").digest  # the token files are named by the tokenizer's content
    assert (tmp_path / f"c-{digest}.bin").is_file() and (tmp_path / f"c-{digest}.idx").is_file()


@pytest.mark.slow
def test_sigterm_checkpoints_after_the_current_step_and_the_rerun_continues_exactly(tiny_overrides, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    steps = 80
    common = ["train", "configs/quickstart.yaml", *tiny_overrides, f"train.max_steps={steps}", "checkpoint.interval=0",
              "train.eval_interval=0"]
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", *common, f"train.run_dir={tmp_path}/pre"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]  # pretrain.train.preemption.EXIT_PREEMPTED
    stopped = int((tmp_path / "pre" / "preempted").read_text())
    assert 3 <= stopped < steps and "stopped by a signal" in out
    assert checkpoint.find_resume(tmp_path / "pre" / "checkpoints", "auto").name == f"step_{stopped:07d}"
    again = run_cli(*common, f"train.run_dir={tmp_path}/pre")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (tmp_path / "pre" / "preempted").exists()
    assert run_cli(*common, f"train.run_dir={tmp_path}/whole").returncode == 0
    a, b = losses(tmp_path / "pre"), losses(tmp_path / "whole")
    assert sorted(a) == list(range(1, steps + 1))  # no step lost or repeated
    assert [a[s] for s in range(1, steps + 1)] == [b[s] for s in range(1, steps + 1)]


def test_a_warmup_longer_than_the_run_is_said(tiny_cfg):
    said: list[str] = []
    run_training(tiny_cfg("train.max_steps=2", "optim.warmup_steps=4", "train.eval_interval=0"),
                 log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("optim.warmup_steps=4 spans all 2 steps" in line and "peaks at 0.0015" in line for line in said), said


def test_evaluation_without_a_validation_split_is_said(tiny_cfg):
    said: list[str] = []
    run_training(tiny_cfg("train.max_steps=2", "data.split=100,0,0", "train.eval_interval=1"),
                 log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("no validation split (data.split=100,0,0)" in line for line in said), said
