"""RunConfig: the one typed, validated source of truth for a run (ARCHITECTURE.md rule 3).

A run is described by a YAML file whose top-level sections match the dataclasses below. Every field
has a default and a one-line doc (the ``doc`` metadata). ``load_config`` reads the YAML, applies dotted
``key=value`` overrides, checks types and values, and raises :class:`ConfigError` naming the key and
what is allowed; the CLI turns that into exit code 2 with no traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in the run config: the message names the key and the fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


def F(default: Any, doc: str) -> Any:
    """A config field with a default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def S(section: type, doc: str) -> Any:
    """A config section: a nested dataclass built fresh for every instance."""
    return field(default_factory=section, metadata={"doc": doc})


@dataclass
class SelfGuidedConfig:
    enabled: bool = F(False, "Self-guided training: o = a*W x + (1-a)*structured(x), a decaying 1->0 (METHODS.md 2).")
    guided_steps: int = F(0, "Optimizer steps over which a decays by cosine; 0 = ratio * max_steps.")
    ratio: float = F(0.4, "guided_steps as a fraction of train.max_steps when guided_steps is 0.")
    mode: Literal["fixed", "same_flops"] = F(
        "fixed", "fixed: a within max_steps; same_flops: max_steps grows by guided_steps, replaying their data.")
    reduce_flop: bool = F(False, "Per layer and forward, run the dense guide only when a random draw < a.")


@dataclass
class FFNConfig:
    kind: Literal["dense", "lowrank", "blockdense", "blockshuffle"] = F(
        "dense", "Linear layers of the FFN: dense, or a structured replacement (METHODS.md 2).")
    activation: Literal["swiglu", "gelu"] = F("swiglu", "SwiGLU (three projections) or a GELU MLP (two).")
    rank: int = F(0, "lowrank / blockdense: rank R of every structured projection.")
    blocks: int = F(2, "blockdense / blockshuffle: number of diagonal blocks B.")
    dense_blocks: int = F(1, "The first this-many blocks keep a dense FFN (structured kinds only).")
    self_guided: SelfGuidedConfig = S(SelfGuidedConfig, "Self-guided training of the structured layers.")


@dataclass
class MoEConfig:
    num_experts: int = F(0, "Routed experts per MoE layer; 0 = dense model (METHODS.md 3).")
    top_k: int = F(2, "Experts each token is routed to.")
    router: Literal["topk_softmax", "noisy_topk", "hash"] = F(
        "topk_softmax", "topk_softmax (Mixtral), noisy_topk (Shazeer 2017), or hash of the token id (no parameters).")
    num_shared_experts: int = F(0, "Always-active shared experts added to the routed output.")
    expert_ffn_hidden_size: int = F(0, "Inner width of each expert; 0 = model.ffn_hidden_size.")
    capacity_factor: float = F(0.0, "c > 0 drops tokens over c*k*T/E per expert to the residual; 0 = dropless.")
    balance_coef: float = F(0.01, "Switch/GShard load-balance loss coefficient (CV^2 losses for noisy_topk).")
    z_coef: float = F(0.001, "Router z-loss coefficient.")
    balance_scope: Literal["micro_batch", "global"] = F(
        "micro_batch", "Tokens the balance and z losses cover: each micro-batch, or the micro-batches of all data-parallel ranks together.")
    every_n: int = F(1, "MoE on every n-th block (blocks n-1, 2n-1, ... 0-based); the others stay dense.")


@dataclass
class ModelConfig:
    vocab_size: int = F(0, "Embedding rows; 0 = the tokenizer's size rounded up to pad_vocab_multiple.")
    pad_vocab_multiple: int = F(64, "Round an automatic vocab size up to a multiple of this.")
    hidden_size: int = F(256, "Model width d.")
    num_layers: int = F(6, "Number of transformer blocks L.")
    num_heads: int = F(4, "Attention query heads; hidden_size must be divisible by it.")
    num_kv_heads: int = F(0, "Key/value heads for grouped-query attention; 0 = num_heads (plain MHA).")
    ffn_hidden_size: int = F(0, "SwiGLU inner width; 0 = 8/3 * hidden_size rounded up to a multiple of 64.")
    rope_theta: float = F(10000.0, "RoPE base frequency.")
    norm_eps: float = F(1e-6, "RMSNorm epsilon (variance computed in fp32).")
    tie_embeddings: bool = F(False, "Share the token embedding with the LM head.")
    init_std: float = F(0.02, "Std of the normal init of every linear and embedding weight.")
    norm: Literal["rmsnorm", "layernorm", "dyt"] = F("rmsnorm", "Normalization layer N (DyT = tanh drop-in).")
    norm_placement: Literal["pre", "post", "mix", "sandwich"] = F(
        "pre", "Where N sits in a block (METHODS.md 1); mix = post for the first mix_ln_ratio of blocks, then pre.")
    mix_ln_ratio: float = F(0.25, "Mix-LN: blocks with 0-based index < floor(ratio * num_layers) are post-LN.")
    norm_scaling: Literal["none", "lns"] = F("none", "lns = LayerNorm Scaling: norm outputs of block l times 1/sqrt(l).")
    attention_kernel: Literal["auto", "sdpa", "blocked"] = F(
        "auto", "Exact causal attention kernel: sdpa (flash on GPU), blocked (skips masked key blocks; fastest on a "
        "CPU, keeps 5/8 of the seq x seq probabilities for backward), auto = blocked on a CPU in bf16 or compiled, else sdpa.")
    ffn: FFNConfig = S(FFNConfig, "Feed-forward layers (dense or structured).")
    moe: MoEConfig = S(MoEConfig, "Mixture of experts.")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64


@dataclass
class SourceConfig:
    path: str = F("", "Local file or glob (.txt/.jsonl/.json/.parquet), or a Hugging Face hub dataset name.")
    type: Literal["auto", "text", "json", "parquet", "hub"] = F(
        "auto", "How to read `path`: auto picks from the file suffix, hub loads a hub dataset by name.")
    text_field: str = F("text", "Column holding the document text (json, parquet, hub).")
    split: str = F("train", "Dataset split to read (`datasets` split syntax, e.g. train[:10%]).")
    name: str = F("", "Hub dataset configuration name, if it has several.")


@dataclass
class BlendEntry:
    path: str = F("", "megatron-core IndexedDataset prefix (without .bin/.idx).")
    weight: float = F(1.0, "Relative sampling weight of this dataset in the blend.")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = F([], "Text sources read through HF datasets; empty = the embedded corpus.")
    blend: list[BlendEntry] = F([], "Existing megatron-core indexed datasets to train on (no preprocessing).")
    prefix: str = F("cache/corpus", "Output prefix of `pretrain preprocess` (PREFIX.bin/.idx) for `sources`.")
    split: str = F("98,2,0", "Megatron train,valid,test split of the documents (weights).")
    seq_len: int = F(256, "Tokens per sample (each sample reads seq_len+1 tokens for the shifted labels).")
    micro_batch_size: int = F(8, "Samples per forward/backward on one data-parallel rank.")
    global_batch_size: int = F(16, "Samples per optimizer step over all ranks (gradient accumulation fills it).")
    preprocess_workers: int = F(2, "Worker processes that tokenize documents during preprocessing.")
    embedded_docs: int = F(0, "Cap on documents of the embedded corpus (0 = all); small values speed tests.")
    prefetch: int = F(0, "Global batches read ahead by a background thread (pinned on cuda); 0 = read in the step.")


@dataclass
class TokenizerConfig:
    path: str = F("cache/tokenizer.model", "sentencepiece model file; trained from the corpus when missing.")
    type: Literal["bpe", "unigram"] = F("bpe", "sentencepiece model type.")
    vocab_size: int = F(8000, "Vocabulary size to train (includes unk/bos/eos/pad).")
    train_sentences: int = F(300_000, "Most lines sampled from the corpus to train the tokenizer.")


@dataclass
class OptimConfig:
    lr: float = F(3e-4, "Peak learning rate.")
    min_lr_ratio: float = F(0.1, "Final learning rate as a fraction of lr.")
    schedule: Literal["cosine", "wsd", "constant"] = F(
        "cosine", "LR schedule after warmup: cosine decay, warmup-stable-decay, or constant.")
    warmup_steps: int = F(100, "Linear warmup steps from 0 to lr.")
    decay_fraction: float = F(0.2, "wsd: fraction of max_steps spent in the final (linear) decay.")
    weight_decay: float = F(0.1, "AdamW decoupled weight decay (never on norms, biases, embeddings).")
    beta1: float = F(0.9, "AdamW beta1.")
    beta2: float = F(0.95, "AdamW beta2.")
    eps: float = F(1e-8, "AdamW epsilon.")
    grad_clip: float = F(1.0, "Clip the global gradient norm to this; 0 = no clipping.")
    impl: Literal["auto", "foreach", "fused", "for_loop"] = F(
        "auto", "AdamW kernels: foreach (multi-tensor), fused, for_loop (per parameter), or auto (torch's choice).")


@dataclass
class TrainConfig:
    run_dir: str = F("runs/default", "Directory for config.yaml, metrics.jsonl, checkpoints/ and tensorboard/.")
    max_steps: int = F(1000, "Optimizer steps of the whole run (the LR schedule spans them).")
    stop_at_step: int = F(0, "Stop with a checkpoint after this step though the schedule spans max_steps; 0 = off.")
    seed: int = F(1234, "Seed of the weights (by parameter name), the data order and every RNG.")
    log_interval: int = F(10, "Steps between console lines and metrics.jsonl entries (1 logs every step).")
    eval_interval: int = F(100, "Steps between validation losses; 0 = only at the end.")
    eval_iters: int = F(4, "Global batches of the validation split per validation loss.")
    resume: str = F("auto", "auto (newest complete checkpoint in run_dir), never, or a checkpoint directory.")
    precision: Literal["fp32", "bf16"] = F("fp32", "bf16 = autocast matmuls to bfloat16 with fp32 master weights.")
    device: Literal["auto", "cpu", "cuda"] = F("auto", "auto = cuda when available, else cpu.")
    compile: bool = F(False, "torch.compile every block (regional) and the loss, after the parallel layout is applied.")
    activation_checkpointing: Literal["none", "full", "selective"] = F(
        "none", "Recompute in backward: full = whole blocks; selective = all but matmul and attention outputs.")
    profile: bool = F(False, "torch profiler trace of train.profile_steps steps (after 1 skipped, 1 warm-up) in RUN_DIR/profile.")
    profile_steps: int = F(3, "Steps recorded by train.profile.")
    sample_prompt: str = F("", "Prompt to sample a short continuation from at the end of training; empty = none.")
    sample_tokens: int = F(48, "Tokens generated for the end-of-run sample.")


@dataclass
class CheckpointConfig:
    interval: int = F(500, "Steps between checkpoints (the last step is always saved); 0 = only at the end.")
    keep: int = F(3, "Number of newest checkpoints kept; older ones are deleted.")
    export_hf: bool = F(False, "At the end of training, export the last checkpoint to RUN_DIR/hf (Hugging Face format).")


@dataclass
class LoggingConfig:
    tensorboard: bool = F(True, "Write tensorboard scalars to RUN_DIR/tensorboard.")
    depth_interval: int = F(0, "Steps between depth diagnostics (per-block grad norm, angular distance); 0 = off.")
    peak_tflops: float = F(0.0, "Peak TFLOP/s for MFU; 0 = datasheet for known GPUs, a quick measurement on CPU.")


@dataclass
class ParallelConfig:
    dp_replicate: int = F(1, "Data-parallel replicas (DDP-style).")
    dp_shard: int = F(1, "Data-parallel shards (FSDP2).")
    tp: int = F(1, "Tensor-parallel degree.")
    ep: int = F(1, "Expert-parallel degree (borrows ranks from data parallel).")
    pp: int = F(1, "Pipeline-parallel ranks; each step's micro-batches (global_batch_size / (micro_batch_size x dp)) are its microbatches.")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev", "gpipe_2bp",
                         "1f1b_2bp"] = F("1f1b", "Pipeline schedule (METHODS.md 6); *_2bp split the backward into input and weight parts.")
    pp_virtual: int = F(1, "Pipeline stages per rank: interleaved_1f1b and zero_bubble take any, zbv and dualpipev need 2.")
    pp_layout: list[int] = F([], "Blocks per stage in stage order (pp x pp_virtual counts); empty = balanced by the cost model.")
    pp_batch_weight_grads: bool = F(False, "Run the deferred weight gradients of consecutive W actions as one GEMM per linear weight.")
    sequence_parallel: bool = F(False, "With tp > 1: shard norms and residuals along the sequence (Megatron SP).")
    loss_parallel: bool = F(True, "With tp > 1: vocab-parallel cross-entropy; the full logits are never gathered.")
    reshard_after_forward: bool = F(True, "FSDP2: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2).")
    param_dtype: Literal["fp32", "bf16"] = F("fp32", "FSDP2 mixed precision: dtype of gathered parameters (reduction is fp32).")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp


@dataclass
class RunConfig:
    model: ModelConfig = S(ModelConfig, "Model architecture.")
    data: DataConfig = S(DataConfig, "Training data.")
    tokenizer: TokenizerConfig = S(TokenizerConfig, "sentencepiece tokenizer.")
    optim: OptimConfig = S(OptimConfig, "Optimizer and LR schedule.")
    train: TrainConfig = S(TrainConfig, "Training loop.")
    checkpoint: CheckpointConfig = S(CheckpointConfig, "Checkpointing.")
    logging: LoggingConfig = S(LoggingConfig, "Logging.")
    parallel: ParallelConfig = S(ParallelConfig, "Parallel layout.")

    def validate(self) -> RunConfig:
        _validate(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply ``section.key=value`` overrides, and validate everything."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", f"config file '{path}' does not exist; pass the path of a YAML run "
                                  "config, e.g. configs/quickstart.yaml.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("", f"'{path}' is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("", f"'{path}' must hold a mapping of sections (model:, data:, ...).")
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw).validate()


def from_dict(raw: dict) -> RunConfig:
    return _build(RunConfig, raw, "")


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(item, "an override must look like section.key=value, e.g. train.max_steps=50.")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    cls: Any = RunConfig
    node = raw
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if not (dataclasses.is_dataclass(cls)):
            raise ConfigError(dotted, "is not a section; overrides go to section.key.")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(dotted, _unknown(part, names))
        if i == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                node[part] = text
        else:
            cls = names[part].type if not isinstance(names[part].type, str) else _hints(cls)[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, "is not a mapping in the YAML file.")


def _unknown(name: str, allowed: dict) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown key.{hint} Allowed here: {', '.join(allowed)}."


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"must be a mapping of keys, got {type(raw).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(dotted, _unknown(str(key), fields))
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}.")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}.")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"must be a string, got {value!r}.")
        return str(value)
    return value


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _validate(cfg: RunConfig) -> None:
    m, d, t, o, tr, c, p = cfg.model, cfg.data, cfg.tokenizer, cfg.optim, cfg.train, cfg.checkpoint, cfg.parallel
    for key, value in [("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
                       ("model.num_heads", m.num_heads), ("data.seq_len", d.seq_len),
                       ("data.micro_batch_size", d.micro_batch_size), ("data.global_batch_size", d.global_batch_size),
                       ("data.preprocess_workers", d.preprocess_workers), ("train.max_steps", tr.max_steps),
                       ("train.log_interval", tr.log_interval), ("train.eval_iters", tr.eval_iters),
                       ("checkpoint.keep", c.keep), ("model.pad_vocab_multiple", m.pad_vocab_multiple),
                       ("train.profile_steps", tr.profile_steps),
                       ("tokenizer.train_sentences", t.train_sentences)]:
        _require(value >= 1, key, f"must be at least 1, got {value}.")
    for key, value in [("model.vocab_size", m.vocab_size), ("model.num_kv_heads", m.num_kv_heads),
                       ("model.ffn_hidden_size", m.ffn_hidden_size), ("train.eval_interval", tr.eval_interval),
                       ("checkpoint.interval", c.interval), ("optim.warmup_steps", o.warmup_steps),
                       ("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip),
                       ("train.stop_at_step", tr.stop_at_step), ("data.embedded_docs", d.embedded_docs),
                       ("train.sample_tokens", tr.sample_tokens), ("data.prefetch", d.prefetch)]:
        _require(value >= 0, key, f"must be 0 or more, got {value}.")
    _require(m.hidden_size % m.num_heads == 0, "model.num_heads",
             f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}; pick a divisor.")
    _require(m.head_dim % 2 == 0, "model.num_heads", f"head dim {m.head_dim} must be even for RoPE.")
    _require(m.num_heads % m.kv_heads == 0, "model.num_kv_heads",
             f"num_heads {m.num_heads} must be a multiple of num_kv_heads {m.kv_heads}.")
    _require(t.vocab_size >= 16, "tokenizer.vocab_size", f"must be at least 16, got {t.vocab_size}.")
    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}.")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must lie in [0, 1], got {o.min_lr_ratio}.")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", f"must lie in (0, 1], got {o.decay_fraction}.")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "betas must lie in [0, 1).")
    _require(d.global_batch_size % d.micro_batch_size == 0, "data.global_batch_size",
             f"{d.global_batch_size} is not a multiple of micro_batch_size {d.micro_batch_size}.")
    _require(not (d.sources and d.blend), "data.blend",
             "set either data.sources (text to preprocess) or data.blend (preprocessed datasets), not both.")
    try:
        weights = [float(x) for x in d.split.split(",")]
        ok = len(weights) == 3 and all(w >= 0 for w in weights) and weights[0] > 0
    except ValueError:
        ok = False
    _require(ok, "data.split", f"got {d.split!r}; give three weights train,valid,test such as '98,2,0'.")
    for i, s in enumerate(d.sources):
        _require(bool(s.path), f"data.sources[{i}].path", "is required: a file, a glob or a hub dataset name.")
    for i, b in enumerate(d.blend):
        _require(bool(b.path), f"data.blend[{i}].path", "is required: an IndexedDataset prefix.")
        _require(b.weight > 0, f"data.blend[{i}].weight", f"must be positive, got {b.weight}.")
    _require(tr.resume in ("auto", "never") or bool(tr.resume), "train.resume",
             "use auto, never or a checkpoint directory.")
    _validate_model(m)
    for key, value in [("parallel.dp_replicate", p.dp_replicate), ("parallel.dp_shard", p.dp_shard),
                       ("parallel.tp", p.tp), ("parallel.ep", p.ep), ("parallel.pp", p.pp)]:
        _require(value >= 1, key, f"must be at least 1, got {value}.")
    dp = p.dp_replicate * p.dp_shard
    _require(d.global_batch_size % (d.micro_batch_size * dp) == 0, "data.global_batch_size",
             f"{d.global_batch_size} must split into {dp} data-parallel ranks x whole micro-batches of "
             f"{d.micro_batch_size}; make it a multiple of {d.micro_batch_size * dp}.")
    _require(p.dp_shard % p.ep == 0, "parallel.ep",
             f"expert parallelism borrows ranks from dp_shard: ep {p.ep} must divide dp_shard {p.dp_shard}.")
    if p.ep > 1:
        _require(m.moe.num_experts > 0 and m.moe.num_experts % p.ep == 0, "parallel.ep",
                 f"ep {p.ep} needs an MoE model whose model.moe.num_experts ({m.moe.num_experts}) it divides.")
    if p.pp > 1:
        _validate_pipeline(cfg)
    if p.tp > 1:
        for key, value in [("model.num_heads", m.num_heads), ("model.num_kv_heads", m.kv_heads),
                           ("model.ffn_hidden_size", m.ffn_size)]:
            _require(value % p.tp == 0, key, f"{value} is not divisible by parallel.tp {p.tp}; pick sizes tp divides.")
        if m.ffn.kind in ("blockdense", "blockshuffle"):
            _require(m.ffn.blocks % p.tp == 0, "model.ffn.blocks",
                     f"tensor parallelism shards whole blocks: parallel.tp {p.tp} must divide blocks {m.ffn.blocks}.")
    _validate_speed(cfg)


def _validate_speed(cfg: RunConfig) -> None:
    tr, o, p = cfg.train, cfg.optim, cfg.parallel
    _require(not (tr.compile and p.tp > 1), "train.compile",
             "regional compilation does not yet work with tensor parallelism (DTensor gradients through the "
             "compiled blocks fail in backward); set train.compile=false or parallel.tp=1.")
    mixed = p.tp > 1 and not p.sequence_parallel and p.dp_replicate * p.dp_shard == 1
    _require(not (mixed and o.impl in ("foreach", "fused")), "optim.impl",
             f"{o.impl} kernels cannot mix the tensor-parallel DTensor weights with the norms, which stay plain "
             "tensors under tensor parallelism alone; use optim.impl=auto or for_loop, or set "
             "parallel.sequence_parallel=true.")


def _validate_pipeline(cfg: RunConfig) -> None:
    m, d, tr, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    from pretrain.parallel.schedules import SPLIT_BACKWARD, V_SHAPED, check_schedule

    stages = p.pp * p.pp_virtual
    _require(p.pp_virtual >= 1, "parallel.pp_virtual", f"must be at least 1, got {p.pp_virtual}.")
    _require(m.num_layers >= stages, "parallel.pp", f"{stages} pipeline stages (pp x pp_virtual) need at least as "
             f"many blocks; model.num_layers is {m.num_layers}.")
    if p.pp_layout:
        _require(len(p.pp_layout) == stages and all(n >= 1 for n in p.pp_layout) and sum(p.pp_layout) == m.num_layers,
                 "parallel.pp_layout", f"got {p.pp_layout}; give {stages} block counts (one per stage, each at least "
                 f"1) that sum to model.num_layers={m.num_layers}, or [] for the cost model.")
    micro_batches = d.global_batch_size // (d.micro_batch_size * p.dp_replicate * p.dp_shard)
    problem = check_schedule(p.pp_schedule, p.pp, micro_batches, p.pp_virtual)
    _require(problem is None, "parallel.pp_schedule", f"{problem}; change data.global_batch_size (the pipeline runs "
             "its micro-batches), parallel.pp_virtual or the schedule.")
    _require(not (tr.compile and p.pp_schedule in SPLIT_BACKWARD), "train.compile",
             f"parallel.pp_schedule={p.pp_schedule} splits the backward into input and weight parts, which torch "
             "does not support under torch.compile; use gpipe or 1f1b, or train.compile=false.")
    if m.tie_embeddings and p.pp_schedule in V_SHAPED and p.dp_replicate * p.dp_shard > 1:
        # The first and the last stage share a rank and the tied weight, which FSDP leaves whole (plan.shared_params).
        _require(cfg.optim.impl not in ("foreach", "fused"), "optim.impl",
                 f"{p.pp_schedule} puts both ends of the tied embedding on one rank, where it stays a plain tensor "
                 f"beside the FSDP-sharded weights, and {cfg.optim.impl} kernels cannot mix the two; use "
                 "optim.impl=auto or for_loop, a looped schedule, or untie the embeddings.")
        _require(p.param_dtype == "fp32" or tr.precision == "bf16", "parallel.param_dtype",
                 f"{p.pp_schedule} puts both ends of the tied embedding on one rank, where FSDP leaves it whole "
                 "and in fp32: only autocast (train.precision=bf16) matches it with bf16 gathered weights; set "
                 "train.precision=bf16, use a looped schedule, or untie the embeddings.")
    if p.pp_batch_weight_grads:
        _require(p.pp_schedule in SPLIT_BACKWARD, "parallel.pp_batch_weight_grads",
                 f"batches deferred weight gradients, which {p.pp_schedule} does not have; use a split-backward "
                 f"schedule ({', '.join(sorted(SPLIT_BACKWARD))}).")
        _require(tr.activation_checkpointing == "none", "parallel.pp_batch_weight_grads",
                 "keeps every linear layer's input until the batched weight backward, which is what activation "
                 "checkpointing drops; set parallel.pp_batch_weight_grads=false or "
                 "train.activation_checkpointing=none.")


def _validate_model(m: ModelConfig) -> None:
    f, moe, sg = m.ffn, m.moe, m.ffn.self_guided
    _require(0.0 <= m.mix_ln_ratio <= 1.0, "model.mix_ln_ratio", f"must lie in [0, 1], got {m.mix_ln_ratio}.")
    for key, value in [("model.ffn.rank", f.rank), ("model.ffn.dense_blocks", f.dense_blocks),
                       ("model.ffn.self_guided.guided_steps", sg.guided_steps),
                       ("model.moe.num_experts", moe.num_experts), ("model.moe.num_shared_experts", moe.num_shared_experts),
                       ("model.moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size),
                       ("model.moe.capacity_factor", moe.capacity_factor), ("model.moe.balance_coef", moe.balance_coef),
                       ("model.moe.z_coef", moe.z_coef)]:
        _require(value >= 0, key, f"must be 0 or more, got {value}.")
    _require(f.blocks >= 1, "model.ffn.blocks", f"must be at least 1, got {f.blocks}.")
    _require(moe.every_n >= 1, "model.moe.every_n", f"must be at least 1, got {moe.every_n}.")
    _require(0.0 < sg.ratio < 1.0, "model.ffn.self_guided.ratio", f"must lie in (0, 1), got {sg.ratio}.")
    _require(not sg.enabled or f.kind != "dense", "model.ffn.self_guided.enabled",
             "self-guided training guides a structured FFN: set model.ffn.kind to lowrank, blockdense or blockshuffle.")
    if moe.num_experts:
        _require(1 <= moe.top_k <= moe.num_experts, "model.moe.top_k",
                 f"must lie in [1, num_experts={moe.num_experts}], got {moe.top_k}.")
    widths = [m.ffn_size] + ([moe.expert_ffn_hidden_size] if moe.num_experts and moe.expert_ffn_hidden_size else [])
    if f.kind in ("lowrank", "blockdense"):
        _require(f.rank >= 1, "model.ffn.rank", f"{f.kind} needs a rank R >= 1 (e.g. hidden_size // 2).")
    if f.kind == "blockdense":
        _require(f.rank % f.blocks == 0, "model.ffn.rank", f"rank {f.rank} must be divisible by blocks {f.blocks}.")
    if f.kind in ("blockdense", "blockshuffle"):
        for width in [m.hidden_size, *widths]:
            _require(width % f.blocks == 0, "model.ffn.blocks",
                     f"{f.blocks} blocks must divide every FFN width (hidden {m.hidden_size}, ffn {widths}); got {width}.")


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every field: the reference behind `pretrain config --help`."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, default, f.metadata.get("doc", "")))
    return rows
