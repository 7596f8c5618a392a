"""Speed switches change the speed, not the run: each leaves the loss unchanged (bitwise where the arithmetic
is the same), keeps checkpoints loadable and resumable; the bench and the profiler write what they promise."""

import json
from pathlib import Path

import pytest
import torch

import pretrain
from pretrain.config import ConfigError, load_config
from pretrain.data.loader import GlobalBatches, PrefetchedBatches
from pretrain.models.transformer import build_model
from pretrain.train.trainer import run_training
from tests.conftest import run_cli


def quiet(*_a, **_k):
    pass


def losses(run_dir) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def train(tiny_cfg, run_dir, *extra) -> dict[int, float]:
    run_training(tiny_cfg(f"train.run_dir={run_dir}", "train.max_steps=3", "train.eval_interval=0", *extra), log=quiet)
    return losses(run_dir)


SWITCHES = {  # name: (overrides, relative tolerance on every step's loss; 0 = bitwise equal)
    "compile": (["train.compile=true"], 1e-4),
    "checkpointing_full": (["train.activation_checkpointing=full"], 0),
    "checkpointing_selective": (["train.activation_checkpointing=selective"], 0),
    "foreach_adamw": (["optim.impl=foreach"], 0),
    "fused_adamw": (["optim.impl=fused"], 1e-5),
    "prefetch": (["data.prefetch=2"], 0),
    "bf16_autocast": (["train.precision=bf16"], 2e-2),
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_speed_switch_leaves_the_loss_unchanged(tiny_cfg, tmp_path, switch):
    overrides, rel = SWITCHES[switch]
    plain = train(tiny_cfg, tmp_path / "plain")
    fast = train(tiny_cfg, tmp_path / switch, *overrides)
    assert sorted(fast) == [1, 2, 3]
    if rel == 0:
        assert fast == plain
    else:
        assert fast == pytest.approx(plain, rel=rel)


def test_compiled_moe_in_fp32_matches_eager(tiny_cfg, tmp_path):
    moe = ["model.moe.num_experts=4", "model.moe.top_k=2"]
    assert train(tiny_cfg, tmp_path / "compiled", *moe, "train.compile=true") == pytest.approx(
        train(tiny_cfg, tmp_path / "eager", *moe), rel=1e-4)


def test_checkpoints_keep_names_and_resume_exactly_with_compile_and_checkpointing(tiny_cfg, tmp_path):
    fast = ["train.compile=true", "train.activation_checkpointing=selective", "optim.impl=fused",
            "data.prefetch=2", "train.max_steps=4", "train.eval_interval=0"]
    run_training(tiny_cfg(f"train.run_dir={tmp_path}/whole", *fast), log=quiet)
    run_training(tiny_cfg(f"train.run_dir={tmp_path}/split", *fast, "train.stop_at_step=2"), log=quiet)
    run_training(tiny_cfg(f"train.run_dir={tmp_path}/split", *fast), log=quiet)
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert [whole[s] for s in (3, 4)] == [split[s] for s in (3, 4)]
    loaded = pretrain.load_model(tmp_path / "whole")
    assert list(loaded.state_dict()) == list(build_model(loaded.cfg, seed=0).state_dict())
    tokens = torch.randint(0, 600, (1, 16))
    assert torch.equal(loaded(tokens), pretrain.load_model(tmp_path / "split")(tokens))


class Samples:
    """A stand-in for GPTDataset: sample i holds the ids i, i+1, ..."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> dict:
        ids = torch.arange(i, i + 9)
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.ones(8)}


def test_prefetched_batches_equal_direct_reads_in_any_order():
    direct = GlobalBatches(Samples(), global_batch_size=4, micro_batch_size=2)
    ahead = PrefetchedBatches(GlobalBatches(Samples(), global_batch_size=4, micro_batch_size=2), depth=3)
    for position in [0, 4, 8, 12, 0, 4, 40, 48, 8]:  # in order, a restart from 0, a jump, wrap-around
        for a, b in zip(ahead(position), direct(position), strict=True):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)


def test_resume_with_prefetch_equals_uninterrupted_bitwise(tiny_cfg, tmp_path):
    common = ["data.prefetch=2", "train.max_steps=6", "train.eval_interval=0"]
    run_training(tiny_cfg(f"train.run_dir={tmp_path}/whole", *common), log=quiet)
    run_training(tiny_cfg(f"train.run_dir={tmp_path}/split", *common, "train.stop_at_step=3"), log=quiet)
    run_training(tiny_cfg(f"train.run_dir={tmp_path}/split", *common), log=quiet)
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert [whole[s] for s in range(4, 7)] == [split[s] for s in range(4, 7)]


def test_profile_writes_a_trace_of_the_recorded_steps(tiny_cfg):
    # 9 steps: long enough for a second cycle of wait/warm-up/record, which must not happen (the profiler's
    # overhead would stay on for the whole run, one more trace every 4 steps)
    cfg = tiny_cfg("train.profile=true", "train.profile_steps=2", "train.max_steps=9", "train.eval_interval=0")
    run_training(cfg, log=quiet)
    traces = list((Path(cfg.train.run_dir) / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}  # counted from 0: #0 skipped, #1 warm-up
    assert any("aten::mm" in e.get("name", "") for e in events)


def test_bench_cli_against_hf_writes_ratio_json(tiny_overrides, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "configs/bench_small.yaml", *tiny_overrides, "model.vocab_size=640", "train.compile=false",
                     "train.precision=bf16", "--against", "hf", "--steps", "2", "--warmup", "1", "--out", str(out),
                     "--profile", str(tmp_path / "prof"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "speedup ours/hf" in result.stdout and "MFU" in result.stdout
    data = json.loads(out.read_text())
    for name in ("ours", "hf"):
        assert {"tokens_per_s", "mfu", "peak_mem_mb", "step_time_s"} <= set(data[name])
        assert data[name]["tokens_per_s"] > 0 and 0 < data[name]["mfu"]
        assert data[name]["loss_first"] == pytest.approx(6.46, abs=0.3)  # ln(640): both start at random
    assert data["speedup"] == pytest.approx(data["ours"]["tokens_per_s"] / data["hf"]["tokens_per_s"])
    assert data["hf"]["model_class"] == "LlamaForCausalLM" and data["hf"]["attn_implementation"] == "sdpa"
    assert data["settings"]["precision"] == {"ours": "bf16", "hf": "bf16"}
    from pretrain.device import bf16_probe

    # bf16 where it is emulated runs, and says so with the measured slowdown
    assert ("without native bf16 matmuls" in result.stdout) == (not bf16_probe(torch.device("cpu")).native)
    for name in ("ours", "hf"):  # --profile: a trace per variant, where the time went in the JSON and printed
        trace = json.loads((tmp_path / "prof" / f"{name}.trace.json").read_text())
        assert any("aten::mm" in e.get("name", "") for e in trace["traceEvents"])
        prof = data["profile"][name]
        assert prof["top"] and sum(row["share"] for row in prof["top"]) <= 1.0 + 1e-9
        assert any("mm" in row["name"] for row in prof["top"][:10])
        assert 0 < prof["busy_ms_per_step"] <= 1.05 * prof["wall_ms_per_step"]  # self times add up to the wall
    assert "CPU operators (self time), per step" in result.stdout


def test_bench_against_mixtral_for_moe_shapes(tiny_cfg):
    from pretrain.bench import run_bench

    cfg = tiny_cfg("model.vocab_size=640", "model.moe.num_experts=4", "model.moe.top_k=2", "train.precision=bf16")
    result = run_bench(cfg, against="hf", steps=1, warmup=0, log=quiet)
    assert result["hf"]["model_class"] == "MixtralForCausalLM"
    assert result["ours"]["tokens_per_s"] > 0 and result["hf"]["tokens_per_s"] > 0


def test_speed_switches_that_cannot_combine_with_a_layout_fail_at_load_time():
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=true", "parallel.tp=2"])
    with pytest.raises(ConfigError, match="optim.impl"):
        load_config(None, ["optim.impl=fused", "parallel.tp=2"])
    load_config(None, ["optim.impl=fused", "parallel.tp=2", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="optim.impl"):
        load_config(None, ["optim.impl=adam8bit"])


def test_resident_memory_counts_weights_and_optimizer_state_once():
    """The bench's per-variant GPU memory adds a variant's resident tensors to its step's peak: parameters and
    buffers by storage (a tied weight once), and the optimizer's state."""
    from pretrain.bench.run import resident_mb

    model = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 1000, bias=False))
    model[1].weight = model[0].weight  # tied: one storage
    model.register_buffer("mask", torch.ones(256, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights_mb = (1000 * 64 + 256 * 256) * 4 / 2**20
    assert resident_mb(model) == pytest.approx(weights_mb)
    assert resident_mb(model, optimizer) == pytest.approx(weights_mb)  # no state before the first step
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    # exp_avg and exp_avg_sq of the one weight, plus its step counter (a scalar tensor)
    assert resident_mb(model, optimizer) == pytest.approx(weights_mb + 2 * 1000 * 64 * 4 / 2**20, abs=1e-3)


def test_datasheet_peak_follows_the_gpu_and_the_fp32_matmul_precision(monkeypatch):
    """MFU on a known GPU divides by its datasheet peak: bf16 tensor cores, and for fp32 the CUDA cores unless
    torch may use TF32. Other devices have none (the bench then uses the measured peak alone)."""
    from pretrain import device as devices

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    assert devices.datasheet_tflops(cuda, "bf16") == 989.0
    assert torch.get_float32_matmul_precision() == "highest"
    assert devices.datasheet_tflops(cuda, "fp32") == 67.0
    try:
        torch.set_float32_matmul_precision("high")
        assert devices.datasheet_tflops(cuda, "fp32") == 494.0
    finally:
        torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert devices.datasheet_tflops(cuda, "bf16") is None
    assert devices.datasheet_tflops(torch.device("cpu"), "bf16") is None


class HostReads(torch.overrides.TorchFunctionMode):
    """Every read of a tensor's value into Python (a host-device sync when the tensor is on a GPU), except
    those of ``host_tensors`` and those made for ``Engine.global_tokens``, which counts the host-side loss
    masks; ``where`` says who asked for each other one."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__bool__, torch.Tensor.numpy, torch.Tensor.cpu}

    def __init__(self, host_tensors: list[torch.Tensor]):
        super().__init__()
        self.host_ids = {id(t) for t in host_tensors}
        self.allowed = 0
        self.finiteness = 0  # reads of whether the gradient norm is finite (train.skip_nonfinite)
        self.where: list[tuple[str, str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            import traceback

            frames = [f for f in traceback.extract_stack() if "/pretrain/" in f.filename]
            if id(args[0]) in self.host_ids or any(f.name == "global_tokens" for f in frames):
                self.allowed += 1
            elif frames and frames[-1].name == "optimizer_step" and func is torch.Tensor.__bool__:
                self.finiteness += 1
            else:
                self.where.append((func.__name__, frames[-1].filename if frames else "?",
                                   frames[-1].lineno if frames else 0))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model,skip_nonfinite", [("dense", False), ("moe", False), ("dense", True)])
def test_train_step_reads_no_device_value_into_python(tiny_cfg, tmp_path, model, skip_nonfinite):
    """No host-device sync inside the step: losses and the gradient norm stay tensors (logging reads them once
    per log interval). The only values read are the token counts of the host-side loss masks and AdamW's
    step counters, which torch keeps on the host, and (``train.skip_nonfinite``, on by default) one flag: whether
    the gradient norm is finite, which decides whether the optimizer steps."""
    from pretrain.bench import our_engine, synthetic_batches

    extra = ["model.moe.num_experts=4", "model.moe.top_k=2"] if model == "moe" else []
    cfg = tiny_cfg("model.vocab_size=640", f"train.skip_nonfinite={str(skip_nonfinite).lower()}", *extra)
    engine = our_engine(cfg)
    if model == "moe":  # the grouped GEMM (the looped experts need their segment sizes on the host)
        assert all(layer.grouped for layer in pretrain.models.moe.moe_layers(engine.model))
    batches = synthetic_batches(cfg, 2)
    engine.train_step(batches[0])  # first step: optimizer state
    counters = [s["step"] for s in engine.optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
    with HostReads(counters) as reads:
        loss, grad_norm = engine.train_step(batches[1])
    assert isinstance(loss, torch.Tensor) and isinstance(grad_norm, torch.Tensor)
    assert reads.allowed > 0 and reads.where == []
    assert reads.finiteness == int(skip_nonfinite)
