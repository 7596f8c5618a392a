"""Normalization layers N (docs/methods.md, normalization): RMSNorm (variance in fp32), LayerNorm, DyT.

Each has ``init_weights`` so the model initialises it by name like every other module; ``gain_init``
lets a block start a norm's gain below one (sandwich post-norms use a depth-scaled gain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gain_init = 1.0
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.type_as(x) * self.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float) -> None:
        self.weight.fill_(self.gain_init)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gain_init = 1.0
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).type_as(x)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float) -> None:
        self.weight.fill_(self.gain_init)
        self.bias.zero_()


class DyT(nn.Module):
    """Dynamic Tanh: y = weight * tanh(alpha * x) + bias, alpha a learnable scalar (init 0.5)."""

    def __init__(self, dim: int, eps: float = 0.0, alpha_init: float = 0.5):
        super().__init__()
        self.alpha_init = alpha_init
        self.gain_init = 1.0
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float) -> None:
        self.alpha.fill_(self.alpha_init)
        self.weight.fill_(self.gain_init)
        self.bias.zero_()


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm, "dyt": DyT}


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return NORMS[kind](dim, eps)
