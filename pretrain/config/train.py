"""The ``optim:``, ``train:``, ``checkpoint:`` and ``logging:`` sections: the optimizer and its schedule, the
loop, checkpoints and what gets logged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.fields import option, require, require_all


@dataclass(frozen=True)
class OptimConfig:
    lr: float = option(3e-4, "Peak learning rate.")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of lr.")
    schedule: Literal["cosine", "wsd", "constant"] = option(
        "cosine", "LR schedule after warmup: cosine decay, warmup-stable-decay, or constant.")
    warmup_steps: int = option(100, "Linear warmup steps from 0 to lr.")
    decay_fraction: float = option(0.2, "wsd: fraction of max_steps spent in the final (linear) decay.")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (never on norms, biases, embeddings).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.95, "AdamW beta2.")
    eps: float = option(1e-8, "AdamW epsilon.")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    impl: Literal["auto", "foreach", "fused", "for_loop"] = option(
        "auto", "AdamW kernels: foreach (multi-tensor), fused, for_loop (per parameter), or auto (torch's choice).")

    def check(self) -> None:
        require_all([("optim.warmup_steps", self.warmup_steps), ("optim.weight_decay", self.weight_decay),
                     ("optim.grad_clip", self.grad_clip)], 0, "0 or more")
        require(0 < self.lr <= 1, "optim.lr", f"must lie in (0, 1], got {self.lr}: AdamW moves every weight by up to "
                "lr per step, and weights are about 0.02; typical values are 1e-4 to 1e-2.")
        require(0 < self.eps < 1, "optim.eps", f"must lie in (0, 1), got {self.eps}; the usual value is 1e-8.")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}.")
        require(0 < self.decay_fraction <= 1, "optim.decay_fraction", f"must lie in (0, 1], got {self.decay_fraction}.")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1", "betas must lie in [0, 1).")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = option("runs/default", "Directory for config.yaml, metrics.jsonl, checkpoints/ and tensorboard/.")
    max_steps: int = option(1000, "Optimizer steps of the whole run (the LR schedule spans them).")
    stop_at_step: int = option(0, "Stop after this step (with a checkpoint unless checkpoint.save_final=false) though the "
                               "schedule spans max_steps; 0 = off.")
    seed: int = option(1234, "Seed of the weights (by parameter name), the data order and every RNG.")
    log_interval: int = option(10, "Steps between console lines and metrics.jsonl entries (1 logs every step).")
    eval_interval: int = option(100, "Steps between validation losses; 0 = only at the end.")
    eval_iters: int = option(4, "Global batches of the validation split per validation loss.")
    resume: str = option("auto", "auto (newest complete checkpoint in run_dir), never (a new run; refused where one "
                         "exists), overwrite (a new run replacing the old one's checkpoints and logs), or a checkpoint "
                         "directory.")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "bf16 = autocast matmuls to bfloat16 with fp32 master weights; auto = bf16 where the device has native "
        "bf16 matmuls (GPUs that support it, CPUs with AVX512_BF16 or AMX), else fp32 (written resolved to "
        "RUN_DIR/config.yaml).")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available, else cpu.")
    compile: bool = option(False, "torch.compile every block (regional) and the loss, after the parallel layout is applied.")
    activation_checkpointing: Literal["none", "full", "selective"] = option(
        "none", "Recompute in backward: full = whole blocks; selective = all but matmul and attention outputs.")
    signal_check_interval: int = option(
        5, "Multi-process runs: steps between the checks (one tiny all-reduce) whether any rank got SIGTERM/SIGUSR1; "
        "a single process checks every step at no cost.")
    preflight: bool = option(True, "Before allocating, stop a run whose memory cannot fit (a floor estimate against "
                             "the memory available) with the estimate and the keys to change.")
    watchdog_factor: float = option(
        10.0, "Report (rank, step, phase) when a step or a phase takes this many times the recent steps' median and at "
        "least watchdog_min_s; 0 = off.")
    watchdog_min_s: float = option(60.0, "The least time before the watchdog reports a slow step or phase.")
    skip_nonfinite: bool = option(
        True, "Skip the optimizer step (weights and optimizer state untouched) when the gradient norm is NaN or "
        "infinite; costs one host read of a flag per step.")
    max_nonfinite_steps: int = option(
        5, "After this many consecutive skipped steps the run stops (exit code 2), or rolls back (nonfinite_rollback).")
    nonfinite_rollback: bool = option(
        False, "Instead of stopping: reload the newest checkpoint and skip the batches read since it (PaLM-style), "
        "at most 3 times a run.")
    profile: bool = option(False, "torch profiler trace of train.profile_steps steps (after 1 skipped, 1 warm-up) in RUN_DIR/profile.")
    profile_steps: int = option(3, "Steps recorded by train.profile.")
    sample_prompt: str = option("", "Prompt to sample a short continuation from at the end of training; empty = none.")
    sample_tokens: int = option(48, "Tokens generated for the end-of-run sample.")

    def check(self) -> None:
        require_all([("train.max_steps", self.max_steps), ("train.log_interval", self.log_interval),
                     ("train.eval_iters", self.eval_iters), ("train.profile_steps", self.profile_steps),
                     ("train.signal_check_interval", self.signal_check_interval),
                     ("train.max_nonfinite_steps", self.max_nonfinite_steps)], 1, "at least 1")
        require_all([("train.eval_interval", self.eval_interval), ("train.stop_at_step", self.stop_at_step),
                     ("train.sample_tokens", self.sample_tokens), ("train.watchdog_factor", self.watchdog_factor),
                     ("train.watchdog_min_s", self.watchdog_min_s)], 0, "0 or more")
        require(self.sample_tokens <= 1024, "train.sample_tokens", f"{self.sample_tokens} is more than the end-of-run "
                "sample is for (a glance at the model, at most 1024 tokens: without a KV cache each token reruns the "
                "context); load the trained model (pretrain.load_model) or export it to generate more.")
        require(0 <= self.seed < 2**32, "train.seed", f"must lie in [0, 2^32 - 1] (the RNGs' range), got {self.seed}.")
        require(self.resume in ("auto", "never", "overwrite") or bool(self.resume), "train.resume",
                "use auto, never, overwrite or a checkpoint directory.")


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = option(500, "Steps between checkpoints (the last step is saved too, see save_final); 0 = only at "
                           "the end.")
    keep: int = option(3, "Number of newest checkpoints kept; older ones are deleted.")
    export_hf: bool = option(False, "At the end of training, export the last checkpoint to RUN_DIR/hf (Hugging Face format).")
    save_final: bool = option(True, "Save after the run's last step (the schedule's end, or train.stop_at_step). "
                              "false: only every checkpoint.interval steps (benchmarks, throwaway runs); a stop by a "
                              "signal and a growth stage's last step are saved either way.")
    verify: Literal["checksums", "sizes", "none"] = option(
        "checksums", "Before resuming, check the checkpoint's files against the sizes (and SHA-256, read in shares by "
        "the ranks) recorded when it was written; auto resume falls back to an older one when they differ.")

    def check(self) -> None:
        require_all([("checkpoint.keep", self.keep)], 1, "at least 1")
        require_all([("checkpoint.interval", self.interval)], 0, "0 or more")
        require(self.save_final or not self.export_hf, "checkpoint.export_hf", "exports the run's last checkpoint, "
                "which checkpoint.save_final=false does not write: set one of them the other way.")


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = option(True, "Write tensorboard scalars to RUN_DIR/tensorboard.")
    depth_interval: int = option(0, "Steps between depth diagnostics (per-block grad norm, angular distance); 0 = off.")
    peak_tflops: float = option(0.0, "Peak TFLOP/s for MFU; 0 = datasheet for known GPUs, a quick measurement on CPU.")

    def check(self) -> None:
        require_all([("logging.depth_interval", self.depth_interval), ("logging.peak_tflops", self.peak_tflops)], 0,
                    "0 or more (0 = off / measured)")
