"""The ``parallel:`` section: the layout (data, tensor, expert and pipeline parallelism) and the rules that
tie it to the model, the batch and the speed switches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pretrain.config.fields import option, require, require_all

if TYPE_CHECKING:
    from pretrain.config.run import RunConfig


@dataclass(frozen=True)
class ParallelConfig:
    dp_replicate: int = option(1, "Data-parallel replicas (DDP-style).")
    dp_shard: int = option(1, "Data-parallel shards (FSDP2).")
    tp: int = option(1, "Tensor-parallel degree.")
    ep: int = option(1, "Expert-parallel degree (borrows ranks from data parallel).")
    pp: int = option(1, "Pipeline-parallel ranks; each step's micro-batches (global_batch_size / (micro_batch_size x dp)) are its microbatches.")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev", "gpipe_2bp",
                         "1f1b_2bp"] = option("1f1b", "Pipeline schedule (docs/parallelism.md); *_2bp split the backward into input and weight parts.")
    pp_virtual: int = option(1, "Pipeline stages per rank: interleaved_1f1b and zero_bubble take any, zbv and dualpipev need 2.")
    pp_layout: list[int] = option([], "Blocks per stage in stage order (pp x pp_virtual counts); empty = balanced by the cost model.")
    pp_batch_weight_grads: bool = option(False, "Run the deferred weight gradients of consecutive W actions as one GEMM per linear weight.")
    sequence_parallel: bool = option(False, "With tp > 1: shard norms and residuals along the sequence (Megatron SP).")
    loss_parallel: bool = option(True, "With tp > 1: vocab-parallel cross-entropy; the full logits are never gathered.")
    reshard_after_forward: bool = option(True, "FSDP2: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2).")
    param_dtype: Literal["fp32", "bf16"] = option("fp32", "FSDP2 mixed precision: dtype of gathered parameters (reduction is fp32).")
    engine: Literal["native", "deepspeed"] = option(
        "native", "Who runs data parallelism: native (FSDP2/DDP/HSDP, with tp, pp and ep) or deepspeed (ZeRO stage "
        "parallel.zero_stage over parallel.dp_shard ranks; no tp, pp or ep).")
    zero_stage: int = option(1, "engine deepspeed: ZeRO stage 1 (optimizer state partitioned), 2 (+ gradients) or 3 "
                                "(+ parameters) over the data-parallel ranks.")
    offload_optimizer: bool = option(False, "engine deepspeed: keep the optimizer state and its step on the CPU "
                                            "(ZeRO-Offload).")
    offload_params: bool = option(False, "engine deepspeed, zero_stage 3: keep the partitioned parameters on the CPU.")
    deepspeed: dict = option({}, "engine deepspeed: more DeepSpeed config keys (e.g. zero_optimization: "
                                 "{reduce_bucket_size: ...}, communication_data_type), checked by DeepSpeed; the keys "
                                 "this config already sets are refused there.")
    collective_timeout_s: int = option(
        600, "Seconds a collective may wait for the other ranks before the run stops naming the rank, step and phase "
        "(a rank that stopped or died); the wait for rank 0 to prepare the data is not bounded.")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: replicas x shards."""
        return self.dp_replicate * self.dp_shard

    def check(self) -> None:
        require_all([("parallel.dp_replicate", self.dp_replicate), ("parallel.dp_shard", self.dp_shard),
                     ("parallel.tp", self.tp), ("parallel.ep", self.ep), ("parallel.pp", self.pp),
                     ("parallel.pp_virtual", self.pp_virtual),
                     ("parallel.collective_timeout_s", self.collective_timeout_s)], 1, "at least 1")
        require(self.dp_shard % self.ep == 0, "parallel.ep",
                f"expert parallelism borrows ranks from dp_shard: ep {self.ep} must divide dp_shard {self.dp_shard}.")


def check_layout(cfg: RunConfig) -> None:
    """The layout against the model, the batch and the speed switches."""
    m, d, p = cfg.model, cfg.data, cfg.parallel
    require(d.global_batch_size % (d.micro_batch_size * p.dp) == 0, "data.global_batch_size",
            f"{d.global_batch_size} must split into {p.dp} data-parallel ranks x whole micro-batches of "
            f"{d.micro_batch_size}; make it a multiple of {d.micro_batch_size * p.dp}.")
    if p.ep > 1:
        require(m.moe.num_experts > 0 and m.moe.num_experts % p.ep == 0, "parallel.ep",
                f"ep {p.ep} needs an MoE model whose model.moe.num_experts ({m.moe.num_experts}) it divides.")
    if p.engine == "deepspeed":
        from pretrain.config.deepspeed import check_deepspeed

        check_deepspeed(cfg)
    if p.pp > 1:
        _check_pipeline(cfg)
    if p.tp > 1:
        for key, value in [("model.num_heads", m.num_heads), ("model.num_kv_heads", m.kv_heads),
                           ("model.ffn_hidden_size", m.ffn_size)]:
            require(value % p.tp == 0, key, f"{value} is not divisible by parallel.tp {p.tp}; pick sizes tp divides.")
        if m.ffn.kind in ("blockdense", "blockshuffle"):
            require(m.ffn.blocks % p.tp == 0, "model.ffn.blocks",
                    f"tensor parallelism shards whole blocks: parallel.tp {p.tp} must divide blocks {m.ffn.blocks}.")
        if m.ffn.kind == "blockshuffle":
            for size in (m.hidden_size, m.ffn_size):
                require(size // m.ffn.blocks % p.tp == 0, "model.ffn.blocks",
                        f"tensor parallelism shards the rows of each block-shuffle block: parallel.tp {p.tp} must "
                        f"divide {size} / blocks {m.ffn.blocks}; use fewer blocks or a smaller tp.")
    _check_speed(cfg)


def _check_speed(cfg: RunConfig) -> None:
    tr, o, p = cfg.train, cfg.optim, cfg.parallel
    require(not (tr.compile and p.tp > 1), "train.compile",
            "regional compilation does not yet work with tensor parallelism (DTensor gradients through the "
            "compiled blocks fail in backward); set train.compile=false or parallel.tp=1.")
    mixed = p.tp > 1 and not p.sequence_parallel and p.dp == 1
    require(not (mixed and o.impl in ("foreach", "fused")), "optim.impl",
            f"{o.impl} kernels cannot mix the tensor-parallel DTensor weights with the norms, which stay plain "
            "tensors under tensor parallelism alone; use optim.impl=auto or for_loop, or set "
            "parallel.sequence_parallel=true.")


def _check_pipeline(cfg: RunConfig) -> None:
    m, d, tr, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    from pretrain.parallel.schedules import SPLIT_BACKWARD, V_SHAPED, check_schedule

    stages = p.pp * p.pp_virtual
    require(m.num_layers >= stages, "parallel.pp", f"{stages} pipeline stages (pp x pp_virtual) need at least as "
            f"many blocks; model.num_layers is {m.num_layers}.")
    if p.pp_layout:
        require(len(p.pp_layout) == stages and all(n >= 1 for n in p.pp_layout) and sum(p.pp_layout) == m.num_layers,
                "parallel.pp_layout", f"got {p.pp_layout}; give {stages} block counts (one per stage, each at least "
                f"1) that sum to model.num_layers={m.num_layers}, or [] for the cost model.")
    micro_batches = d.global_batch_size // (d.micro_batch_size * p.dp)
    problem = check_schedule(p.pp_schedule, p.pp, micro_batches, p.pp_virtual)
    require(problem is None, "parallel.pp_schedule", f"{problem}; change data.global_batch_size (the pipeline runs "
            "its micro-batches), parallel.pp_virtual or the schedule.")
    require(not (tr.compile and p.pp_schedule in SPLIT_BACKWARD), "train.compile",
            f"parallel.pp_schedule={p.pp_schedule} splits the backward into input and weight parts, which torch "
            "does not support under torch.compile; use gpipe or 1f1b, or train.compile=false.")
    if m.tie_embeddings and p.pp_schedule in V_SHAPED and p.dp > 1:
        # The first and the last stage share a rank and the tied weight, which FSDP leaves whole (plan.shared_params).
        require(cfg.optim.impl not in ("foreach", "fused"), "optim.impl",
                f"{p.pp_schedule} puts both ends of the tied embedding on one rank, where it stays a plain tensor "
                f"beside the FSDP-sharded weights, and {cfg.optim.impl} kernels cannot mix the two; use "
                "optim.impl=auto or for_loop, a looped schedule, or untie the embeddings.")
        require(p.param_dtype == "fp32" or tr.precision in ("bf16", "auto"), "parallel.param_dtype",
                f"{p.pp_schedule} puts both ends of the tied embedding on one rank, where FSDP leaves it whole "
                "and in fp32: only autocast (train.precision=bf16) matches it with bf16 gathered weights; set "
                "train.precision=bf16, use a looped schedule, or untie the embeddings.")
    if p.pp_batch_weight_grads:
        require(p.pp_schedule in SPLIT_BACKWARD, "parallel.pp_batch_weight_grads",
                f"batches deferred weight gradients, which {p.pp_schedule} does not have; use a split-backward "
                f"schedule ({', '.join(sorted(SPLIT_BACKWARD))}).")
        require(tr.activation_checkpointing == "none", "parallel.pp_batch_weight_grads",
                "keeps every linear layer's input until the batched weight backward, which is what activation "
                "checkpointing drops; set parallel.pp_batch_weight_grads=false or "
                "train.activation_checkpointing=none.")
