"""train.precision: auto picks bf16 only where bf16 matmuls are native (decided by the CPU's features or the GPU,
checked against a direct timing), resolves to a concrete precision before anything uses it, and an explicit bf16
where it is emulated is kept but said."""

from __future__ import annotations

import time

import torch
import yaml

from pretrain import device as devices
from pretrain.models.attention import uses_blocked_kernel
from pretrain.train.trainer import run_training

CPU = torch.device("cpu")


def best_seconds(x: torch.Tensor, y: torch.Tensor, reps: int = 4) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ y
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def test_probe_agrees_with_a_direct_timing():
    probe = devices.bf16_probe(CPU)
    a, b = torch.randn(768, 768), torch.randn(768, 768)
    ratio = best_seconds(a.bfloat16(), b.bfloat16()) / best_seconds(a, b)
    assert probe.native == (ratio < 1.2), (probe, ratio)
    assert probe.slowdown is not None and probe.how


def test_precision_resolution():
    native = devices.bf16_probe(CPU).native
    assert devices.resolve_precision("fp32", CPU) == ("fp32", None)
    chosen, note = devices.resolve_precision("auto", CPU)
    assert chosen == ("bf16" if native else "fp32") and note.startswith(f"train.precision=auto: {chosen}")
    kept, warning = devices.resolve_precision("bf16", CPU)
    assert kept == "bf16"
    assert (warning is None) if native else ("emulated" in warning and "train.precision=auto or fp32" in warning)
    # The attention kernel follows the precision the run uses, not the word "auto".
    assert uses_blocked_kernel("auto", CPU, chosen, compiled=False) == (chosen == "bf16")


def test_auto_precision_is_written_resolved(tiny_overrides, tmp_path):
    from pretrain.config import load_config

    lines = []
    cfg = load_config(None, [*tiny_overrides, "train.precision=auto", "train.max_steps=2", "train.eval_interval=0"])
    run_training(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["precision"] == devices.resolve_precision("auto", CPU)[0]
    assert any(line.startswith("train.precision=auto: ") for line in lines)
