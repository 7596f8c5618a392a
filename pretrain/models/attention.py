"""Grouped-query causal self-attention with rotary position embeddings.

RoPE uses the rotate-half convention of Llama in Hugging Face `transformers` (the two halves of each
head dimension form the rotated pairs), so exported q/k weights need no permutation. Attention runs
through ``scaled_dot_product_attention`` with ``is_causal=True``, except in bf16 or compiled on a CPU, where
``blocked_causal_attention`` is faster: PyTorch's CPU flash kernel reaches only a sixth of the bf16 matmul
peak there (``benchmarks/bench_attention.py``).
"""

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (seq_len, head_dim), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             block_size: int = 128) -> torch.Tensor:
    """Exact causal softmax attention, (batch, heads, seq, head_dim) in and out, that skips the fully masked
    key blocks: each block of ``block_size`` queries attends to its key prefix only, so at 4 blocks 5/8 of
    the full score matrix is computed. Every row's softmax sees all of its keys at once, so nothing is
    approximated. Plain matmuls and a masked softmax: torch.compile fuses the mask and softmax (and their
    backward) into one pass each. Scores and probabilities are kept in the input dtype, as in eager
    attention in ``transformers``; the softmax itself accumulates in fp32."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves a group of query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    seq = q.shape[-2]
    q = q * q.shape[-1] ** -0.5  # on q (seq x head_dim values a head) rather than on the seq x seq scores
    out = []
    for start in range(0, seq, block_size):
        end = min(start + block_size, seq)
        scores = q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1)
        visible = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(start)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out.append(probs @ v[:, :, :end])
    return torch.cat(out, dim=-2)


def uses_blocked_kernel(kernel: str, device: torch.device, precision: str, compiled: bool) -> bool:
    """Whether ``kernel`` resolves to the blocked kernel for a run on ``device`` (``causal_attention``'s rule)."""
    if kernel != "auto":
        return kernel == "blocked"
    return device.type == "cpu" and (precision == "bf16" or compiled)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Exact causal attention through ``kernel``: "sdpa", "blocked" (``blocked_causal_attention``) or "auto",
    the faster of the two. On a CPU that is the blocked one in bf16 and under torch.compile: at 8 x 512 tokens
    and 8 heads of 64 it takes 0.37x the time of SDPA's CPU flash kernel forward and backward compiled in bf16
    (0.47x eager) and 0.69x compiled in fp32 (``benchmarks/bench_attention.py``), and makes the compiled bf16
    training step ~1.25x faster. In eager fp32 the flash kernel is as fast and its step measured 3% faster
    (it keeps no probabilities), so it stays. GPU flash kernels skip the masked blocks themselves."""
    if kernel == "auto":
        fast = q.dtype == torch.bfloat16 or torch.compiler.is_compiling()
        kernel = "blocked" if q.device.type == "cpu" and fast else "sdpa"
    if kernel == "blocked":
        return blocked_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, kernel: str = "auto"):
        super().__init__()
        self.kernel = kernel  # of causal_attention: auto, sdpa or blocked
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 rather than the configured head count: under tensor parallelism a rank holds only some heads.
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, self.kernel)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
