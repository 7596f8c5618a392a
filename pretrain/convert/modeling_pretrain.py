"""Hugging Face modeling code for `pretrain` models that no stock transformers architecture represents
exactly: post / Mix-LN / sandwich norm placement, LayerNorm Scaling, LayerNorm and DyT, GELU FFNs, kept
structured FFN linears (lowrank, blockdense, blockshuffle), and mixture-of-experts layers with top-k softmax,
noisy top-k or hash routing, a capacity limit and shared experts.

`pretrain export` writes this file, unchanged, next to config.json (whose ``auto_map`` names the two classes
below) and model.safetensors, so the export loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. It imports only torch and transformers:
the user of an export need not have `pretrain`. Parameter names are those of the training code, and the
forward is the training code's forward in eval mode (noisy top-k adds no noise; the capacity limit applies as
it does in training and evaluation). There is no KV cache: ``generate`` recomputes the whole sequence at
every step, which is fine for the short samples these models are for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class PretrainConfig(PretrainedConfig):
    """Per-layer facts are lists indexed by layer: ``layer_placements`` (pre, post or sandwich),
    ``layer_scales`` (1/sqrt(l) under LayerNorm Scaling, else 1) and ``moe_layers`` (indices of MoE blocks).
    ``ffn_kind`` is the linear of the FFNs from block ``ffn_dense_blocks`` on (dense when pre-merged)."""

    model_type = "pretrain"

    def __init__(self, vocab_size: int = 256, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int = 4, rope_theta: float = 10000.0,
                 norm: str = "rmsnorm", norm_eps: float = 1e-6, layer_placements: list | None = None,
                 layer_scales: list | None = None, tie_embeddings: bool = False, activation: str = "swiglu",
                 intermediate_size: int = 128, ffn_kind: str = "dense", ffn_rank: int = 0, ffn_blocks: int = 1,
                 ffn_dense_blocks: int = 1, moe_layers: list | None = None, num_experts: int = 0,
                 num_experts_per_tok: int = 1, router: str = "topk_softmax", capacity_factor: float = 0.0,
                 num_shared_experts: int = 0, expert_intermediate_size: int = 0, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.rope_theta, self.norm, self.norm_eps = rope_theta, norm, norm_eps
        self.layer_placements = layer_placements or ["pre"] * num_hidden_layers
        self.layer_scales = layer_scales or [1.0] * num_hidden_layers
        self.tie_embeddings, self.activation, self.intermediate_size = tie_embeddings, activation, intermediate_size
        self.ffn_kind, self.ffn_rank, self.ffn_blocks, self.ffn_dense_blocks = ffn_kind, ffn_rank, ffn_blocks, ffn_dense_blocks
        self.moe_layers = moe_layers or []
        self.num_experts, self.num_experts_per_tok, self.router = num_experts, num_experts_per_tok, router
        self.capacity_factor, self.num_shared_experts = capacity_factor, num_shared_experts
        self.expert_intermediate_size = expert_intermediate_size
        # The head shares the embedding inside forward(); transformers' own weight tying stays off.
        kwargs["tie_word_embeddings"] = False
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)


# ---- norms ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).type_as(x)


class DyT(nn.Module):
    """Dynamic Tanh: weight * tanh(alpha * x) + bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 0.5))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm, "dyt": DyT}


# ---- attention -----------------------------------------------------------------------------------------
def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def padding_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """None when nothing is padded (plain causal attention); else causal and not-a-pad-key, with every query
    attending at least to itself so fully padded rows stay finite. RoPE is relative, so left padding needs
    no shift of the positions."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    device = attention_mask.device
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    mask = causal & attention_mask.bool()[:, None, None, :]
    return mask | torch.eye(seq_len, dtype=torch.bool, device=device)


class Attention(nn.Module):
    def __init__(self, config: PretrainConfig):
        super().__init__()
        d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d // heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


# ---- structured linears (input N, output M, no bias) ---------------------------------------------------
class LowRankLinear(nn.Module):
    """y = U (V x)."""

    def __init__(self, n: int, m: int, rank: int, blocks: int):
        super().__init__()
        self.V = nn.Parameter(torch.empty(rank, n))
        self.U = nn.Parameter(torch.empty(m, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U)


class BlockDenseLinear(nn.Module):
    """y = U blockdiag(V_1..V_B) x."""

    def __init__(self, n: int, m: int, rank: int, blocks: int):
        super().__init__()
        self.blocks = blocks
        self.V = nn.Parameter(torch.empty(blocks, rank // blocks, n // blocks))
        self.U = nn.Parameter(torch.empty(m, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("...bn,brn->...br", x.unflatten(-1, (self.blocks, -1)), self.V)
        return F.linear(h.flatten(-2), self.U)


class BlockShuffleLinear(nn.Module):
    """y = Q blockdiag(W2) P blockdiag(W1) x; P views the k = min(N, M) middle features as (k/B, B) and
    transposes, Q puts row s of output block j at s*B + j."""

    def __init__(self, n: int, m: int, rank: int, blocks: int):
        super().__init__()
        k = min(n, m)
        self.blocks = blocks
        self.W1 = nn.Parameter(torch.empty(blocks, k // blocks, n // blocks))
        self.W2 = nn.Parameter(torch.empty(blocks, m // blocks, k // blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("...bn,bkn->...bk", x.unflatten(-1, (self.blocks, -1)), self.W1)
        h = h.flatten(-2).unflatten(-1, (-1, self.blocks)).transpose(-1, -2)
        y = torch.einsum("...bk,bmk->...bm", h, self.W2)
        return y.transpose(-1, -2).flatten(-2)


STRUCTURED = {"lowrank": LowRankLinear, "blockdense": BlockDenseLinear, "blockshuffle": BlockShuffleLinear}


def linear_factory(config: PretrainConfig, structured: bool):
    if not structured:
        return lambda n, m: nn.Linear(n, m, bias=False)
    cls = STRUCTURED[config.ffn_kind]
    return lambda n, m: cls(n, m, config.ffn_rank, config.ffn_blocks)


class FFN(nn.Module):
    """swiglu: down(silu(gate(x)) * up(x)); gelu: down(gelu(up(x)))."""

    def __init__(self, config: PretrainConfig, width: int, structured: bool):
        super().__init__()
        linear, d = linear_factory(config, structured), config.hidden_size
        self.activation = config.activation
        if self.activation == "swiglu":
            self.gate_proj = linear(d, width)
        self.up_proj = linear(d, width)
        self.down_proj = linear(width, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


# ---- mixture of experts --------------------------------------------------------------------------------
class TopKSoftmaxRouter(nn.Module):
    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        top_logits, idx = logits.topk(self.top_k, dim=-1)
        return idx, top_logits.softmax(dim=-1)


class NoisyTopKRouter(nn.Module):
    """Shazeer 2017 in eval mode: no noise, softmax over the kept top-k of x W_gate."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.w_gate = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.w_noise = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, num_experts = self.top_k, self.w_gate.shape[0]
        logits = F.linear(x.float(), self.w_gate.float())
        top_vals, top_idx = logits.topk(min(k + 1, num_experts), dim=-1)
        return top_idx[:, :k], top_vals[:, :k].softmax(dim=-1)


class HashRouter(nn.Module):
    """Expert = table[token id] (the training run's fixed random table, stored with the weights), weight 1/k."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.register_buffer("table", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.table[token_ids]
        return idx, torch.full(idx.shape, 1.0 / self.top_k, device=x.device)


ROUTERS = {"topk_softmax": TopKSoftmaxRouter, "noisy_topk": NoisyTopKRouter, "hash": HashRouter}


class MoE(nn.Module):
    """Routed experts plus shared experts. Assignments are sorted by expert, every token's first choice before
    its second; with capacity_factor c > 0 each expert keeps its first ceil(c*k*T/E) assignments and the rest
    add nothing (the token passes through the residual)."""

    def __init__(self, config: PretrainConfig, structured: bool):
        super().__init__()
        d, f, E = config.hidden_size, config.expert_intermediate_size, config.num_experts
        self.num_experts, self.top_k, self.activation = E, config.num_experts_per_tok, config.activation
        self.capacity_factor = config.capacity_factor
        self.router = ROUTERS[config.router](config)
        self.experts = None
        if structured:
            self.experts = nn.ModuleList([FFN(config, f, structured) for _ in range(E)])
        else:
            if self.activation == "swiglu":
                self.w_gate = nn.Parameter(torch.empty(E, f, d))
            self.w_up = nn.Parameter(torch.empty(E, f, d))
            self.w_down = nn.Parameter(torch.empty(E, d, f))
        self.shared_experts = nn.ModuleList([FFN(config, f, structured) for _ in range(config.num_shared_experts)])

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.experts is not None:
            return self.experts[e](x)
        up = F.linear(x, self.w_up[e])
        hidden = F.silu(F.linear(x, self.w_gate[e])) * up if self.activation == "swiglu" else F.gelu(up)
        return F.linear(hidden, self.w_down[e])

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        T, k, E = B * S, self.top_k, self.num_experts
        x_flat = x.reshape(T, d)
        idx, weight = self.router(x_flat, token_ids.reshape(T))
        flat_expert = idx.t().reshape(-1)
        flat_token = torch.arange(T, device=x.device).repeat(k)
        sorted_expert, order = torch.sort(flat_expert, stable=True)
        sorted_weight = weight.t().reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=E)
        kept_counts = counts
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * k * T / E)
            starts = counts.cumsum(0) - counts
            position = torch.arange(T * k, device=x.device) - starts[sorted_expert]
            sorted_weight = sorted_weight * (position < capacity)
            kept_counts = counts.clamp(max=capacity)
        xs = x_flat[flat_token[order]]
        ys = xs.new_zeros(xs.shape)
        start = 0
        for e, (count, kept) in enumerate(zip(counts.tolist(), kept_counts.tolist(), strict=True)):
            if kept:
                ys[start:start + kept] = self.expert(e, xs[start:start + kept])
            start += count
        weighted = ys.float() * sorted_weight[:, None]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(T * k, device=x.device)
        out = weighted[inverse].view(k, T, d).sum(dim=0)
        for shared in self.shared_experts:
            out = out + shared(x_flat)
        return out.to(x.dtype).view(B, S, d)


# ---- blocks and the model ------------------------------------------------------------------------------
class Block(nn.Module):
    """pre: h = x + f(s N1(x)), y = h + g(s N2(h)); post: h = s N1(x + f(x)), y = s N2(h + g(h));
    sandwich: h = x + s P1(f(s N1(x))), y = h + s P2(g(s N2(h)))."""

    def __init__(self, config: PretrainConfig, layer_idx: int):
        super().__init__()
        norm = NORMS[config.norm]
        d, eps = config.hidden_size, config.norm_eps
        self.placement = config.layer_placements[layer_idx]
        self.scale = config.layer_scales[layer_idx]
        self.is_moe = layer_idx in config.moe_layers
        structured = config.ffn_kind != "dense" and layer_idx >= config.ffn_dense_blocks
        self.attn_norm = norm(d, eps)
        self.attn = Attention(config)
        self.ffn_norm = norm(d, eps)
        self.ffn = MoE(config, structured) if self.is_moe else FFN(config, config.intermediate_size, structured)
        if self.placement == "sandwich":
            self.attn_post_norm = norm(d, eps)
            self.ffn_post_norm = norm(d, eps)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = norm(x)
        return out * self.scale if self.scale != 1.0 else out

    def _ffn(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.ffn(x, token_ids) if self.is_moe else self.ffn(x)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], token_ids: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        if self.placement == "post":
            h = self._norm(self.attn_norm, x + self.attn(x, rope, mask))
            return self._norm(self.ffn_norm, h + self._ffn(h, token_ids))
        if self.placement == "sandwich":
            h = x + self._norm(self.attn_post_norm, self.attn(self._norm(self.attn_norm, x), rope, mask))
            return h + self._norm(self.ffn_post_norm, self._ffn(self._norm(self.ffn_norm, h), token_ids))
        h = x + self.attn(self._norm(self.attn_norm, x), rope, mask)
        return h + self._ffn(self._norm(self.ffn_norm, h), token_ids)


class PretrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainConfig
    base_model_prefix = "transformer"  # no such submodule: parameter names are the training code's
    _no_split_modules = ["Block"]

    def __init__(self, config: PretrainConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_hidden_layers)})
        self.norm = NORMS[config.norm](config.hidden_size, config.norm_eps)
        if not config.tie_embeddings:
            self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutput:
        x = self.embed(input_ids)
        seq_len = input_ids.shape[1]
        rope = rope_tables(seq_len, self.config.hidden_size // self.config.num_attention_heads,
                           self.config.rope_theta, input_ids.device)
        mask = padding_mask(attention_mask, seq_len)
        for block in self.blocks.values():
            x = block(x, rope, input_ids, mask)
        head = self.embed.weight if self.config.tie_embeddings else self.head.weight
        logits = F.linear(self.norm(x), head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        # No KV cache: every step sees the whole sequence.
        return {"input_ids": input_ids, "attention_mask": attention_mask}
