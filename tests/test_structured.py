"""Structured FFN linears and self-guided training (docs/methods.md, structured FFN layers)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from pretrain.models.ffn import FFN
from pretrain.models.structured import (
    BlockDenseLinear,
    BlockShuffleLinear,
    LowRankLinear,
    SelfGuided,
    alpha_at,
    structured_linear,
    structured_param_count,
)

STD = 0.02
SHAPES = [(32, 48), (48, 32)]
LAYERS = [("lowrank", 8, 1), ("blockdense", 8, 2), ("blockdense", 16, 4), ("blockshuffle", 0, 2),
          ("blockshuffle", 0, 4)]
CASES = [(kind, n, m, rank, blocks) for n, m in SHAPES for kind, rank, blocks in LAYERS]


def build(kind: str, n: int, m: int, rank: int, blocks: int, seed: int = 0, **kw) -> nn.Module:
    layer = structured_linear(kind, n, m, rank=rank, blocks=blocks, **kw)
    layer.init_weights(torch.Generator().manual_seed(seed), STD)
    return layer


@pytest.mark.parametrize("kind,n,m,rank,blocks", CASES)
def test_layer_equals_its_premerged_dense_matrix(kind, n, m, rank, blocks):
    layer = build(kind, n, m, rank, blocks)
    x = torch.randn(3, 5, n)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dense_weight().T, rtol=1e-5, atol=1e-5)


def blockshuffle_by_hand(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """The block-shuffle authors' convention spelled out index by index, for one input vector x: chunk b of
    x through W1[b] gives the middle features h (block-major); block j of W2 reads h[i*B + j], i = 0..k/B-1;
    row s of block j's output lands at output index s*B + j."""
    B, kb, nb = W1.shape
    mb = W2.shape[1]
    h = torch.zeros(B * kb, dtype=x.dtype)
    for b in range(B):
        for r in range(kb):
            h[b * kb + r] = sum(W1[b, r, c] * x[b * nb + c] for c in range(nb))
    y = torch.zeros(B * mb, dtype=x.dtype)
    for j in range(B):
        for s in range(mb):
            y[s * B + j] = sum(W2[j, s, i] * h[i * B + j] for i in range(kb))
    return y


@pytest.mark.parametrize("n,m", [(8, 12), (12, 8), (16, 16)])
@pytest.mark.parametrize("blocks", [2, 4])
def test_blockshuffle_follows_the_authors_indexing(n, m, blocks):
    layer = build("blockshuffle", n, m, 0, blocks)
    x = torch.randn(n, dtype=torch.float64)
    with torch.no_grad():
        W1, W2 = layer.W1.double(), layer.W2.double()
        expected = blockshuffle_by_hand(x, W1, W2)
        layer.double()
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.dense_weight() @ x, expected, rtol=1e-12, atol=1e-12)
        columns = torch.stack([blockshuffle_by_hand(e, W1, W2) for e in torch.eye(n, dtype=torch.float64)], 1)
        torch.testing.assert_close(layer.dense_weight(), columns, rtol=1e-12, atol=1e-12)
        concatenated = torch.block_diag(*W2.unbind(0)) @ torch.block_diag(*W1.unbind(0)) @ x
        assert not torch.allclose(layer(x), concatenated)  # the shuffles are not the identity


@pytest.mark.parametrize("kind,n,m,rank,blocks", CASES + [("dense", 32, 48, 0, 1)])
def test_param_count_matches_methods_formula(kind, n, m, rank, blocks):
    expected = {"dense": m * n, "lowrank": (n + m) * rank, "blockdense": rank * (m + n / blocks),
                "blockshuffle": min(n, m) * (n + m) / blocks}[kind]
    layer = structured_linear(kind, n, m, rank=rank, blocks=blocks)
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert structured_param_count(kind, n, m, rank=rank, blocks=blocks) == expected


def test_lowrank_init_is_top_r_svd_of_the_dense_draw():
    n, m, r = 48, 32, 8
    layer = build("lowrank", n, m, r, 1, seed=7)
    w = torch.empty(m, n).normal_(0.0, STD, generator=torch.Generator().manual_seed(7))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(layer.V.detach(), s[:r].sqrt()[:, None] * vh[:r])
    torch.testing.assert_close(layer.U.detach(), u[:, :r] * s[:r].sqrt())
    residual = (w - layer.dense_weight().detach()).pow(2).sum()  # Eckart-Young: the optimal rank-r error
    torch.testing.assert_close(residual, s[r:].pow(2).sum(), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("kind,rank", [("blockdense", 8), ("blockshuffle", 0)])
def test_block_factors_are_orthogonalised(kind, rank):
    layer = build(kind, 32, 48, rank, 2)
    for factor in layer.parameters():
        if factor.dim() != 3:
            continue
        svals = torch.linalg.svdvals(factor.detach())
        torch.testing.assert_close(svals, svals[..., :1].expand_as(svals), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("kind,n,m,rank,blocks", CASES)
def test_self_guided_at_alpha_one_equals_guide_and_guide_equals_structured_at_init(kind, n, m, rank, blocks):
    layer = build(kind, n, m, rank, blocks, self_guided=True)
    assert layer.alpha == 1.0
    x = torch.randn(4, n)
    with torch.no_grad():
        torch.testing.assert_close(layer.guide, layer.structured.dense_weight())
        torch.testing.assert_close(layer(x), x @ layer.guide.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), layer.structured(x), rtol=1e-5, atol=1e-6)


def test_alpha_schedule_is_cosine_from_one_to_zero():
    assert alpha_at(0, 100) == 1.0
    assert alpha_at(50, 100) == pytest.approx(0.5)
    assert alpha_at(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert alpha_at(100, 100) == 0.0
    assert alpha_at(250, 100) == 0.0
    assert alpha_at(0, 0) == 0.0


def guided_with_distinct_guide(alpha: float) -> SelfGuided:
    layer = build("lowrank", 32, 48, 8, 1, self_guided=True)
    with torch.no_grad():
        layer.guide.add_(1.0)  # so the mixture and the pure structured output differ
    layer.alpha, layer.reduce_flop = alpha, True
    return layer


def test_reduce_flop_runs_dense_branch_with_probability_alpha_in_training():
    layer = guided_with_distinct_guide(0.3)
    x = torch.randn(2, 32)
    with torch.no_grad():
        structured = layer.structured(x)
        mixture = 0.3 * x @ layer.guide.T + 0.7 * structured
        torch.manual_seed(0)
        dense_runs, trials = 0, 400
        for _ in range(trials):
            out = layer(x)
            if torch.allclose(out, mixture, rtol=1e-5, atol=1e-6):
                dense_runs += 1
            else:
                torch.testing.assert_close(out, structured)
    assert abs(dense_runs / trials - 0.3) < 0.1


def test_reduce_flop_never_skips_in_eval():
    layer = guided_with_distinct_guide(0.3).eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        mixture = 0.3 * x @ layer.guide.T + 0.7 * layer.structured(x)
        for _ in range(50):
            torch.testing.assert_close(layer(x), mixture)


def test_remove_guide_frees_the_parameter_and_leaves_the_structured_branch():
    layer = guided_with_distinct_guide(0.5)
    layer.remove_guide()
    assert not layer.has_guide and layer.alpha == 0.0
    assert "guide" not in dict(layer.named_parameters()) and "guide" not in layer.state_dict()
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.structured(x))
        torch.testing.assert_close(layer.dense_weight(), layer.structured.dense_weight())


@pytest.mark.parametrize("kind,n,m,rank,blocks", CASES)
def test_gradients_reach_every_factor_and_the_guide(kind, n, m, rank, blocks):
    layer = build(kind, n, m, rank, blocks, self_guided=True)
    layer.alpha = 0.5
    layer(torch.randn(4, n)).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind,n,m,rank,blocks", CASES)
def test_init_is_determined_by_the_generator_seed(kind, n, m, rank, blocks):
    a, b, c = (build(kind, n, m, rank, blocks, seed=s, self_guided=True) for s in (1, 1, 2))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
        assert not torch.equal(pa, pc), name


def test_factory_builds_ffn_projections_of_the_requested_kind():
    ffn = FFN(32, 64, linear=partial(structured_linear, "blockdense", rank=8, blocks=2, self_guided=True))
    assert isinstance(ffn.gate_proj.structured, BlockDenseLinear)
    assert isinstance(structured_linear("lowrank", 32, 64, rank=4), LowRankLinear)
    assert isinstance(structured_linear("blockshuffle", 32, 64, blocks=2), BlockShuffleLinear)
    assert isinstance(structured_linear("dense", 32, 64, self_guided=True), nn.Linear)
    gen = torch.Generator().manual_seed(0)
    for proj in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
        proj.init_weights(gen, STD)
    assert ffn(torch.randn(2, 5, 32)).shape == (2, 5, 32)
