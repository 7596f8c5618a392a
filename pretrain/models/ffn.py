"""Feed-forward networks built on a linear factory: SwiGLU (Llama) or a GELU MLP.

The factory ``linear(in_features, out_features)`` returns ``nn.Linear`` for a dense FFN or a structured
linear (``structured.py``), so every FFN kind shares this one definition (docs/methods.md, structured FFN layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LinearFactory = Callable[[int, int], nn.Module]


def dense_linear(in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


class FFN(nn.Module):
    """swiglu: down(silu(gate(x)) * up(x)); gelu: down(gelu(up(x)))."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 linear: LinearFactory = dense_linear):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = linear(hidden_size, ffn_hidden_size)
        self.up_proj = linear(hidden_size, ffn_hidden_size)
        self.down_proj = linear(ffn_hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))
