"""One transformer block with its normalization placement and scaling (docs/methods.md, normalization).

Notation: block l = layer_idx + 1 (1-based global depth), f = attention, g = FFN, N1/N2 its norms,
s = 1/sqrt(l) under LayerNorm Scaling (a plain float: buffers are wiped by meta-device init), else 1.
  pre       h = x + f(s*N1(x));         y = h + g(s*N2(h))
  post      h = s*N1(x + f(x));         y = s*N2(h + g(h))
  mix       post for layer_idx < floor(mix_ln_ratio * num_layers), pre after
  sandwich  h = x + s*P1(f(s*N1(x)));   y = h + s*P2(g(s*N2(h)))   (P = post-norms, gain 1/sqrt(2L))
``layer_idx`` is the global index, so a pipeline stage holding blocks 7..12 scales and places exactly as the
whole model does.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.attention import Attention
from pretrain.models.ffn import FFN
from pretrain.models.norm import build_norm

if TYPE_CHECKING:
    from pretrain.models.moe import MoEContext


def placement(cfg: ModelConfig, layer_idx: int) -> str:
    """The resolved placement of one block: mix becomes post or pre by depth."""
    if cfg.norm_placement == "mix":
        return "post" if layer_idx < math.floor(cfg.mix_ln_ratio * cfg.num_layers) else "pre"
    return cfg.norm_placement


def is_moe_block(cfg: ModelConfig, layer_idx: int) -> bool:
    return cfg.moe.num_experts > 0 and (layer_idx + 1) % cfg.moe.every_n == 0


def build_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Dense, structured (from block ``ffn.dense_blocks`` on) or MoE feed-forward for one block."""
    f = cfg.ffn
    structured = f.kind != "dense" and layer_idx >= f.dense_blocks
    linear = None
    if structured:
        from pretrain.models.structured import structured_linear

        linear = functools.partial(structured_linear, f.kind, rank=f.rank, blocks=f.blocks,
                                   self_guided=f.self_guided.enabled)
    if is_moe_block(cfg, layer_idx):
        from pretrain.models.moe import MoE

        width = cfg.moe.expert_ffn_hidden_size or cfg.ffn_size
        factory = (lambda: FFN(cfg.hidden_size, width, f.activation, linear)) if linear else None
        return MoE(cfg, expert_factory=factory, layer_idx=layer_idx)
    if linear:
        return FFN(cfg.hidden_size, cfg.ffn_size, f.activation, linear)
    return FFN(cfg.hidden_size, cfg.ffn_size, f.activation)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # 0-based global depth index: the same under any pipeline split
        self.placement = placement(cfg, layer_idx)
        self.scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.norm_scaling == "lns" else 1.0
        self.attn_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.attention_kernel)
        self.ffn_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.ffn = build_ffn(cfg, layer_idx)
        self.is_moe = is_moe_block(cfg, layer_idx)
        if self.placement == "sandwich":
            self.attn_post_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
            self.ffn_post_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
            for norm in (self.attn_post_norm, self.ffn_post_norm):
                norm.gain_init = 1.0 / math.sqrt(2 * cfg.num_layers)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = norm(x)
        return out * self.scale if self.scale != 1.0 else out

    def _ffn(self, x: torch.Tensor, token_ids: torch.Tensor | None, moe: MoEContext | None) -> torch.Tensor:
        return self.ffn(x, token_ids, moe=moe) if self.is_moe else self.ffn(x)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                token_ids: torch.Tensor | None = None, moe: MoEContext | None = None) -> torch.Tensor:
        """``moe``: the training step's MoE context (router losses and load statistics), None for inference."""
        if self.placement == "post":
            h = self._norm(self.attn_norm, x + self.attn(x, rope))
            return self._norm(self.ffn_norm, h + self._ffn(h, token_ids, moe))
        if self.placement == "sandwich":
            h = x + self._norm(self.attn_post_norm, self.attn(self._norm(self.attn_norm, x), rope))
            return h + self._norm(self.ffn_post_norm, self._ffn(self._norm(self.ffn_norm, h), token_ids, moe))
        h = x + self.attn(self._norm(self.attn_norm, x), rope)
        return h + self._ffn(self._norm(self.ffn_norm, h), token_ids, moe)
