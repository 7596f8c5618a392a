"""Benchmarks: ``pretrain bench`` (``run.py``) and the harness it shares with ``benchmarks/`` (``harness.py``)."""

from pretrain.bench.harness import matmul_peak_tflops, synthetic_batches, write_json
from pretrain.bench.run import our_engine, run_bench

__all__ = ["matmul_peak_tflops", "our_engine", "run_bench", "synthetic_batches", "write_json"]
