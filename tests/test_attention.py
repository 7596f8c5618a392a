"""Causal attention kernels: the blocked kernel computes what SDPA computes (fp32 to float rounding, bf16 to
bf16 rounding), with grouped-query heads, eager and compiled, and on a tensor-parallel rank's share of heads."""

import functools

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.attention import Attention, blocked_causal_attention, causal_attention, rope_tables


def qkv(dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, seq: int = 80, head_dim: int = 16):
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, heads, seq, head_dim)] + [(2, kv_heads, seq, head_dim)] * 2
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for shape in shapes]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def out_and_grads(kernel, q, k, v) -> list[torch.Tensor]:
    out = kernel(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return [out, *torch.autograd.grad(out, (q, k, v), grad)]


@pytest.mark.parametrize("block_size", [16, 32, 128])  # 80 queries: 5 blocks, 2.5 (a partial last one), 1
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_blocked_matches_sdpa_in_fp32(block_size, kv_heads):
    q, k, v = qkv(torch.float32, kv_heads=kv_heads)
    blocked = functools.partial(blocked_causal_attention, block_size=block_size)
    for ours, ref in zip(out_and_grads(blocked, q, k, v), out_and_grads(sdpa, q, k, v), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_blocked_in_bf16_is_as_close_to_fp64_as_sdpa_in_bf16():
    q, k, v = qkv(torch.bfloat16)
    exact = out_and_grads(sdpa, *[x.detach().double().requires_grad_() for x in (q, k, v)])
    blocked, sdpa_bf16 = out_and_grads(blocked_causal_attention, q, k, v), out_and_grads(sdpa, q, k, v)
    for ours, flash, ref in zip(blocked, sdpa_bf16, exact, strict=True):
        ours_err = ((ours.double() - ref).norm() / ref.norm()).item()
        flash_err = ((flash.double() - ref).norm() / ref.norm()).item()
        # Scores are rounded to bf16 before the softmax (flash keeps them in fp32): up to ~2x its error.
        assert ours_err < 1e-2 and ours_err < 3 * flash_err


def test_compiled_blocked_matches_sdpa():
    q, k, v = qkv(torch.float32)
    compiled = torch.compile(functools.partial(blocked_causal_attention, block_size=32))
    for ours, ref in zip(out_and_grads(compiled, q, k, v), out_and_grads(sdpa, q, k, v), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_auto_kernel_on_a_cpu_is_the_blocked_one_in_bf16_or_compiled():
    q, k, v = qkv(torch.bfloat16)
    assert torch.equal(causal_attention(q, k, v), blocked_causal_attention(q, k, v))
    q, k, v = qkv(torch.float32)
    flash = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(causal_attention(q, k, v), flash)
    compiled = torch.compile(causal_attention)(q, k, v)
    torch.testing.assert_close(compiled, blocked_causal_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert not torch.equal(compiled, flash)


def test_tensor_parallel_ranks_with_half_the_heads_sum_to_the_full_attention():
    hidden, heads, kv_heads, head_dim = 64, 4, 2, 16
    torch.manual_seed(0)
    full = Attention(hidden, heads, kv_heads, kernel="sdpa")
    x = torch.randn(2, 40, hidden)
    rope = rope_tables(40, head_dim, 10000.0, x.device)
    total = torch.zeros_like(x)
    for rank in range(2):  # column-parallel q/k/v (a rank's heads), row-parallel o (their input features)
        q_rows = slice(rank * 2 * head_dim, (rank + 1) * 2 * head_dim)
        kv_rows = slice(rank * head_dim, (rank + 1) * head_dim)
        shard = Attention(hidden, heads, kv_heads, kernel="blocked")
        with torch.no_grad():
            shard.q_proj = torch.nn.Linear(hidden, 2 * head_dim, bias=False)
            shard.q_proj.weight.copy_(full.q_proj.weight[q_rows])
            for name in ("k_proj", "v_proj"):
                setattr(shard, name, torch.nn.Linear(hidden, head_dim, bias=False))
                getattr(shard, name).weight.copy_(getattr(full, name).weight[kv_rows])
            shard.o_proj = torch.nn.Linear(2 * head_dim, hidden, bias=False)
            shard.o_proj.weight.copy_(full.o_proj.weight[:, q_rows])
            total += shard(x, rope)
    torch.testing.assert_close(total, full(x, rope).detach(), rtol=1e-5, atol=1e-5)


def test_config_picks_the_kernel_of_every_block():
    from pretrain.config import load_config
    from pretrain.models.transformer import build_model

    for kernel in ("auto", "sdpa", "blocked"):
        cfg = load_config(None, ["model.vocab_size=64", "model.num_layers=2", f"model.attention_kernel={kernel}"])
        assert {block.attn.kernel for block in build_model(cfg.model, seed=0).blocks.values()} == {kernel}
