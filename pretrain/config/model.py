"""The ``model:`` section: architecture, normalization, structured FFNs and mixture of experts
(docs/methods.md), with the rules that need nothing but the model's own keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.fields import option, require, require_all, section


@dataclass(frozen=True)
class SelfGuidedConfig:
    enabled: bool = option(False, "Self-guided training: o = a*W x + (1-a)*structured(x), a decaying 1->0 (docs/methods.md).")
    guided_steps: int = option(0, "Optimizer steps over which a decays by cosine; 0 = ratio * max_steps.")
    ratio: float = option(0.4, "guided_steps as a fraction of train.max_steps when guided_steps is 0.")
    mode: Literal["fixed", "same_flops"] = option(
        "fixed", "fixed: a within max_steps; same_flops: max_steps grows by guided_steps, replaying their data.")
    reduce_flop: bool = option(False, "Per layer and forward, run the dense guide only when a random draw < a.")


@dataclass(frozen=True)
class FFNConfig:
    kind: Literal["dense", "lowrank", "blockdense", "blockshuffle"] = option(
        "dense", "Linear layers of the FFN: dense, or a structured replacement (docs/methods.md).")
    activation: Literal["swiglu", "gelu"] = option("swiglu", "SwiGLU (three projections) or a GELU MLP (two).")
    rank: int = option(0, "lowrank / blockdense: rank R of every structured projection.")
    blocks: int = option(2, "blockdense / blockshuffle: number of diagonal blocks B.")
    dense_blocks: int = option(1, "The first this-many blocks keep a dense FFN (structured kinds only).")
    self_guided: SelfGuidedConfig = section(SelfGuidedConfig, "Self-guided training of the structured layers.")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = option(0, "Routed experts per MoE layer; 0 = dense model (docs/methods.md).")
    top_k: int = option(2, "Experts each token is routed to.")
    router: Literal["topk_softmax", "noisy_topk", "hash"] = option(
        "topk_softmax", "topk_softmax (Mixtral), noisy_topk (Shazeer 2017), or hash of the token id (no parameters).")
    num_shared_experts: int = option(0, "Always-active shared experts added to the routed output.")
    expert_ffn_hidden_size: int = option(0, "Inner width of each expert; 0 = model.ffn_hidden_size.")
    capacity_factor: float = option(0.0, "c > 0 drops tokens over c*k*T/E per expert to the residual; 0 = dropless.")
    balance_coef: float = option(0.01, "Switch/GShard load-balance loss coefficient (CV^2 losses for noisy_topk).")
    z_coef: float = option(0.001, "Router z-loss coefficient.")
    balance_scope: Literal["micro_batch", "global"] = option(
        "micro_batch", "Tokens the balance and z losses cover: each micro-batch, or the micro-batches of all data-parallel ranks together.")
    every_n: int = option(1, "MoE on every n-th block (blocks n-1, 2n-1, ... 0-based); the others stay dense.")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = option(0, "Embedding rows; 0 = the tokenizer's size rounded up to pad_vocab_multiple.")
    pad_vocab_multiple: int = option(64, "Round an automatic vocab size up to a multiple of this.")
    hidden_size: int = option(256, "Model width d.")
    num_layers: int = option(6, "Number of transformer blocks L.")
    num_heads: int = option(4, "Attention query heads; hidden_size must be divisible by it.")
    num_kv_heads: int = option(0, "Key/value heads for grouped-query attention; 0 = num_heads (plain MHA).")
    ffn_hidden_size: int = option(0, "SwiGLU inner width; 0 = 8/3 * hidden_size rounded up to a multiple of 64.")
    rope_theta: float = option(10000.0, "RoPE base frequency.")
    norm_eps: float = option(1e-6, "RMSNorm epsilon (variance computed in fp32).")
    tie_embeddings: bool = option(False, "Share the token embedding with the LM head.")
    init_std: float = option(0.02, "Std of the normal init of every linear and embedding weight.")
    norm: Literal["rmsnorm", "layernorm", "dyt"] = option("rmsnorm", "Normalization layer N (DyT = tanh drop-in).")
    norm_placement: Literal["pre", "post", "mix", "sandwich"] = option(
        "pre", "Where N sits in a block (docs/methods.md); mix = post for the first mix_ln_ratio of blocks, then pre.")
    mix_ln_ratio: float = option(0.25, "Mix-LN: blocks with 0-based index < floor(ratio * num_layers) are post-LN.")
    norm_scaling: Literal["none", "lns"] = option("none", "lns = LayerNorm Scaling: norm outputs of block l times 1/sqrt(l).")
    attention_kernel: Literal["auto", "sdpa", "blocked"] = option(
        "auto", "Exact causal attention kernel: sdpa (flash on GPU), blocked (skips masked key blocks; fastest on a "
        "CPU, keeps 5/8 of the seq x seq probabilities for backward), auto = blocked on a CPU in bf16 or compiled, else sdpa.")
    ffn: FFNConfig = section(FFNConfig, "Feed-forward layers (dense or structured).")
    moe: MoEConfig = section(MoEConfig, "Mixture of experts.")

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

    def check(self) -> None:
        f, moe, sg = self.ffn, self.moe, self.ffn.self_guided
        require_all([("model.hidden_size", self.hidden_size), ("model.num_layers", self.num_layers),
                     ("model.num_heads", self.num_heads), ("model.pad_vocab_multiple", self.pad_vocab_multiple),
                     ("model.ffn.blocks", f.blocks), ("model.moe.every_n", moe.every_n)], 1, "at least 1")
        require_all([("model.vocab_size", self.vocab_size), ("model.num_kv_heads", self.num_kv_heads),
                     ("model.ffn_hidden_size", self.ffn_hidden_size), ("model.ffn.rank", f.rank),
                     ("model.ffn.dense_blocks", f.dense_blocks),
                     ("model.ffn.self_guided.guided_steps", sg.guided_steps),
                     ("model.moe.num_experts", moe.num_experts), ("model.moe.num_shared_experts", moe.num_shared_experts),
                     ("model.moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size),
                     ("model.moe.capacity_factor", moe.capacity_factor), ("model.moe.balance_coef", moe.balance_coef),
                     ("model.moe.z_coef", moe.z_coef)], 0, "0 or more")
        for key, value in [("model.init_std", self.init_std), ("model.norm_eps", self.norm_eps),
                           ("model.rope_theta", self.rope_theta)]:
            require(value > 0, key, f"must be positive, got {value}.")
        require(self.init_std <= 1, "model.init_std", f"got {self.init_std}; weights drawn this wide overflow at once "
                "(the usual value is 0.02).")
        require(self.hidden_size % self.num_heads == 0, "model.num_heads",
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; pick a divisor.")
        require(self.head_dim % 2 == 0, "model.num_heads", f"head dim {self.head_dim} must be even for RoPE.")
        require(self.num_heads % self.kv_heads == 0, "model.num_kv_heads",
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.kv_heads}.")
        require(0.0 <= self.mix_ln_ratio <= 1.0, "model.mix_ln_ratio", f"must lie in [0, 1], got {self.mix_ln_ratio}.")
        require(0.0 < sg.ratio < 1.0, "model.ffn.self_guided.ratio", f"must lie in (0, 1), got {sg.ratio}.")
        require(not sg.enabled or f.kind != "dense", "model.ffn.self_guided.enabled",
                "self-guided training guides a structured FFN: set model.ffn.kind to lowrank, blockdense or blockshuffle.")
        if moe.num_experts:
            require(1 <= moe.top_k <= moe.num_experts, "model.moe.top_k",
                    f"must lie in [1, num_experts={moe.num_experts}], got {moe.top_k}.")
        widths = [self.ffn_size] + ([moe.expert_ffn_hidden_size] if moe.num_experts and moe.expert_ffn_hidden_size else [])
        if f.kind in ("lowrank", "blockdense"):
            require(f.rank >= 1, "model.ffn.rank", f"{f.kind} needs a rank R >= 1 (e.g. hidden_size // 2).")
            most = min(self.hidden_size, *widths)  # a factor of a d x d_ff matrix has at most min(d, d_ff) rank
            require(f.rank <= most, "model.ffn.rank", f"{f.rank} is above what a {self.hidden_size} x {min(widths)} "
                    f"FFN matrix has (at most {most}): lower it, e.g. model.ffn.rank={max(most // 2, 1)}.")
        if f.kind == "blockdense":
            require(f.rank % f.blocks == 0, "model.ffn.rank", f"rank {f.rank} must be divisible by blocks {f.blocks}.")
        if f.kind == "blockshuffle":
            require(f.blocks >= 2, "model.ffn.blocks", f"blockshuffle needs at least 2 blocks (got {f.blocks}): one "
                    "block has more parameters than the dense layer it replaces; the usual value is 2 or 4.")
        if f.kind in ("blockdense", "blockshuffle"):
            for width in [self.hidden_size, *widths]:
                require(width % f.blocks == 0, "model.ffn.blocks",
                        f"{f.blocks} blocks must divide every FFN width (hidden {self.hidden_size}, ffn {widths}); got {width}.")


# The keys that change the shapes of the weights (dotted below ``model.``): a checkpoint that will not load under a
# config differing in one of them holds another model; a difference in any other key (the init, the attention
# kernel, ...) leaves a load failure the damage it looks like. A new key that shapes a weight belongs here.
SHAPE_KEYS = frozenset((
    "vocab_size", "pad_vocab_multiple", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
    "tie_embeddings", "norm", "norm_placement", "ffn.activation", "ffn.kind", "ffn.rank", "ffn.blocks",
    "ffn.dense_blocks", "ffn.self_guided.enabled", "moe.num_experts", "moe.every_n", "moe.router",
    "moe.expert_ffn_hidden_size", "moe.num_shared_experts"))


def check_placement(m: ModelConfig) -> None:
    """The user's model has a block of the kind its settings ask for. Checked on the config a user gives (`pretrain
    train`, `assemble`, `bench`), not on the configs derived from it: an assembly's meta model has one block per
    module, where an MoE placed every 4th block may have none."""
    if m.moe.num_experts:
        require(m.moe.every_n <= m.num_layers, "model.moe.every_n",
                f"every {m.moe.every_n}th block is MoE, but the model has {m.num_layers} blocks, so none would be: "
                f"set it to {m.num_layers} or less.")
    if m.ffn.kind != "dense":
        require(m.ffn.dense_blocks < m.num_layers, "model.ffn.dense_blocks",
                f"the first {m.ffn.dense_blocks} blocks stay dense, but the model has {m.num_layers}, so no block "
                f"would be {m.ffn.kind}: set it below {m.num_layers} (the usual value is 1).")

