"""``parallel.engine: deepspeed``: the DeepSpeed config built from the run config (there is no separate JSON to keep
in sync), what DeepSpeed cannot run together with our parallelism, and the checked passthrough of extra keys."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from pretrain.config.fields import ConfigError, require

if TYPE_CHECKING:
    from pretrain.config.run import RunConfig

# Keys the run config sets (from data.*, optim.*, train.* and parallel.*): refused in the passthrough.
OWNED = {
    "train_batch_size": "data.global_batch_size", "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "data.global_batch_size / (micro_batch_size x dp)",
    "gradient_clipping": "optim.grad_clip", "optimizer": "optim.* (AdamW)", "scheduler": "optim.schedule",
    "bf16": "train.precision", "fp16": "train.precision", "amp": "train.precision",
    "torch_autocast": "train.precision", "activation_checkpointing": "train.activation_checkpointing",
    "compile": "train.compile", "zero_allow_untested_optimizer": "(always true: the optimizer is torch AdamW)",
    "zero_force_ds_cpu_optimizer": "(always false: the optimizer is torch AdamW)",
}
OWNED_ZERO = {"stage": "parallel.zero_stage", "offload_optimizer": "parallel.offload_optimizer",
              "offload_param": "parallel.offload_params"}
# Top-level DeepSpeed sections the passthrough takes (each checked by DeepSpeed itself where it has a schema).
PASSTHROUGH = ("zero_optimization", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
               "sparse_gradients", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
               "comms_logger", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "timers", "aio",
               "data_types", "seq_parallel_communication_data_type")


def check_deepspeed(cfg: RunConfig) -> None:
    """What the DeepSpeed engine cannot do with the rest of the config, each with the working alternative."""
    p, tr = cfg.parallel, cfg.train
    native = "parallel.engine=native (FSDP2"
    require(p.zero_stage in (1, 2, 3), "parallel.zero_stage",
            f"must be 1, 2 or 3, got {p.zero_stage}; for plain replicated data parallelism use {native} with "
            "parallel.dp_replicate).")
    require(p.pp == 1, "parallel.pp", f"the DeepSpeed engine runs none of our pipeline schedules; use {native} "
                                      "composes with every schedule) or parallel.pp=1.")
    require(p.tp == 1, "parallel.tp", f"the DeepSpeed engine does not compose with our tensor parallelism; use "
                                      f"{native} with tp) or parallel.tp=1.")
    require(p.ep == 1, "parallel.ep", f"the DeepSpeed engine does not compose with our expert parallelism (its "
                                      f"experts are partitioned like any weight); use {native} with ep) or parallel.ep=1.")
    require(p.dp_replicate == 1, "parallel.dp_replicate",
            "with the DeepSpeed engine set parallel.dp_shard to the number of data-parallel ranks (ZeRO partitions "
            "over all of them); dp_replicate is FSDP2's HSDP.")
    require(p.param_dtype == "fp32", "parallel.param_dtype",
            "is FSDP2's gather dtype; with the DeepSpeed engine the weights stay fp32 and train.precision=bf16 "
            "autocasts the matmuls, as in the native engine.")
    require(not p.offload_params or p.zero_stage == 3, "parallel.offload_params",
            f"parameter offload needs partitioned parameters: set parallel.zero_stage=3 (now {p.zero_stage}).")
    require(not tr.compile, "train.compile",
            "regional compilation is not supported with the DeepSpeed engine yet; set train.compile=false or use "
            f"{native}).")
    require(not cfg.model.ffn.self_guided.enabled, "model.ffn.self_guided.enabled",
            "self-guided training drops its dense guides from the optimizer mid-run, which DeepSpeed's flattened "
            f"ZeRO partitions cannot; use {native}) for self-guided runs.")
    require(not cfg.logging.depth_interval, "logging.depth_interval",
            "depth diagnostics read every block's whole gradient, which ZeRO partitions; set "
            f"logging.depth_interval=0 or use {native}).")
    require(not cfg.growth, "growth",
            f"growth stages are not run by the DeepSpeed engine; grow with {native}), or offline with `pretrain "
            "grow` from a DeepSpeed checkpoint and train the grown model with either engine.")
    require(not cfg.assembly.modules, "assembly.modules",
            f"model assembly trains with {native}); the assembled model's checkpoints train on with either engine.")
    check_passthrough(p.deepspeed)


def check_passthrough(extra: dict) -> None:
    for key in extra:
        require(key not in OWNED, f"parallel.deepspeed.{key}", f"is set from {OWNED.get(key)}; set it there.")
        require(key in PASSTHROUGH, f"parallel.deepspeed.{key}",
                f"is not a DeepSpeed key this engine passes on; allowed: {', '.join(PASSTHROUGH)}.")
    zero = extra.get("zero_optimization", {})
    require(isinstance(zero, dict), "parallel.deepspeed.zero_optimization", f"must be a mapping, got {zero!r}.")
    for key in zero:
        require(key not in OWNED_ZERO, f"parallel.deepspeed.zero_optimization.{key}",
                f"is set from {OWNED_ZERO.get(key)}; set it there.")
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        raise ConfigError("parallel.engine", "deepspeed is not installed: pip install deepspeed (or "
                                             "pip install -e '.[deepspeed]'), or use parallel.engine=native.") from None
    batch = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}  # (x the world, if one is up)
    try:
        DeepSpeedConfig({**batch, **copy.deepcopy(extra)})
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises pydantic errors, AssertionErrors and others
        raise ConfigError("parallel.deepspeed", f"DeepSpeed refuses it: {' '.join(str(e).split())[:400]}") from None


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    """The DeepSpeed config of a run: our batch, clipping and ZeRO settings, then the passthrough keys."""
    d, p = cfg.data, cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.train.device != "cpu"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.train.device != "cpu"}
    extra = copy.deepcopy(p.deepspeed)
    zero.update(extra.pop("zero_optimization", {}))
    return {
        "train_batch_size": d.global_batch_size,
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": d.global_batch_size // (d.micro_batch_size * dp_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # The optimizer is ours (torch AdamW with our groups and kernels); DeepSpeed's fused CPU Adam would compile
        # on first use for minutes.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,  # our progress log says what DeepSpeed would
        **extra,
    }
