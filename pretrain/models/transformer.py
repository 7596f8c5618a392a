"""Llama-style decoder: embed -> blocks (ModuleDict keyed by global block index) -> final norm -> head.

Weights are initialised by ``init_weights`` from the seed and each parameter's global name alone, so
every parallel layout and every device starts from the same values (docs/architecture.md, data flow).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.attention import rope_tables
from pretrain.models.block import Block, is_moe_block
from pretrain.models.moe import MoEContext
from pretrain.models.norm import build_norm


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be resolved (from the tokenizer) before building")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Keys are global block indices: a pipeline stage keeps only its own keys, names stay global.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_layers)})
        self.norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)  # final norm: never scaled
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self._rope: dict = {}

    def tie_weights(self) -> None:
        """Share the embedding with the head; again after ``to_empty()``, which replaces each parameter
        separately and so unties them."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Cached as a plain attribute, not a buffer: buffers are wiped by meta-device to_empty().
        key = (seq_len, str(device))
        if key not in self._rope:
            self._rope = {key: rope_tables(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device)}
        return self._rope[key]

    def forward(self, tokens: torch.Tensor, moe: MoEContext | None = None) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab). ``moe``: the training step's MoE context
        (router losses and load statistics; see ``models.moe``), None for inference."""
        x = self.embed(tokens)
        rope = self.rope(tokens.shape[1], tokens.device)
        for block in self.blocks.values():
            x = block(x, rope, tokens, moe=moe)  # token ids reach every block: hash-routed MoE layers need them
        return self.head(self.norm(x))


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float) -> None:
    """Initialise every parameter from a CPU generator seeded by (seed, global name): independent of
    layout, device and build order. A module with its own ``init_weights(generator, std)`` (norms,
    structured linears, MoE) initialises its whole subtree from the generator of its name; any other
    weight is N(0, std) and any other bias zero."""
    owners: list[str] = []
    for module_name, module in model.named_modules():
        if any(module_name.startswith(owner + ".") for owner in owners):
            continue
        if module is not model and hasattr(module, "init_weights"):
            module.init_weights(torch.Generator().manual_seed(_param_seed(seed, module_name)), std)
            owners.append(module_name)
            continue
        for pname, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if pname == "bias":
                param.zero_()
            else:
                gen = torch.Generator().manual_seed(_param_seed(seed, name))
                param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=gen))


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """Build on the meta device, materialise on ``device``, then initialise by name."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model, seed, cfg.init_std)
    return model


_NORM_PARAMS = {"rmsnorm": lambda d: d, "layernorm": lambda d: 2 * d, "dyt": lambda d: 2 * d + 1}


def _ffn_params(cfg: ModelConfig, layer_idx: int, width: int) -> int:
    """Parameters of one FFN of inner width ``width`` in block ``layer_idx`` (self-guided guides excluded)."""
    f, d = cfg.ffn, cfg.hidden_size
    n_in = 2 if f.activation == "swiglu" else 1
    if f.kind == "dense" or layer_idx < f.dense_blocks:
        return (n_in + 1) * d * width
    from pretrain.models.structured import structured_param_count

    def linear(n: int, m: int) -> int:
        return structured_param_count(f.kind, n, m, rank=f.rank, blocks=f.blocks)

    return n_in * linear(d, width) + linear(width, d)


@dataclass(frozen=True)
class BlockParts:
    """Matmul parameters of one block by role (norms excluded): how a layout splits them and how many a token
    uses both follow from these."""
    attention: int  # q, k, v and output projections
    ffn: int  # the dense or structured FFN (0 in an MoE block)
    router: int
    shared_experts: int
    expert: int  # one routed expert (0 in a dense block)
    num_experts: int
    top_k: int

    def matmul(self, active: bool) -> int:
        """All of the block's matmul parameters, or with ``active`` only those one token uses (top-k experts)."""
        routed = (self.top_k if active else self.num_experts) * self.expert
        return self.attention + self.ffn + self.router + self.shared_experts + routed


def block_parts(cfg: ModelConfig, layer_idx: int) -> BlockParts:
    d, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    attn = 2 * d * d + 2 * d * kv
    if not is_moe_block(cfg, layer_idx):
        return BlockParts(attn, _ffn_params(cfg, layer_idx, cfg.ffn_size), 0, 0, 0, 0, 0)
    moe = cfg.moe
    expert = _ffn_params(cfg, layer_idx, moe.expert_ffn_hidden_size or cfg.ffn_size)
    router = {"topk_softmax": 1, "noisy_topk": 2, "hash": 0}[moe.router] * moe.num_experts * d
    return BlockParts(attn, 0, router, moe.num_shared_experts * expert, expert, moe.num_experts, moe.top_k)


def _block_params(cfg: ModelConfig, layer_idx: int, active: bool) -> int:
    """Matmul parameters of one block, and with ``active`` only those one token uses (top-k experts)."""
    return block_parts(cfg, layer_idx).matmul(active)


def num_params(cfg: ModelConfig) -> int:
    """Parameter count from the config alone (tied embeddings counted once; self-guided guides, which
    exist only during the guided phase, not counted)."""
    d, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    norm = _NORM_PARAMS[cfg.norm](d)
    norms_per_block = 4 if cfg.norm_placement == "sandwich" else 2
    blocks = sum(_block_params(cfg, i, active=False) + norms_per_block * norm for i in range(L))
    return V * d + blocks + norm + (0 if cfg.tie_embeddings else V * d)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters a token uses, head included, embedding lookup
    excluded) plus causal-agnostic attention 6 x 2 x L x seq x d (the PaLM / Megatron convention)."""
    d, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    matmul_params = sum(_block_params(cfg, i, active=True) for i in range(L)) + V * d
    return 6.0 * matmul_params + 12.0 * L * seq_len * d
