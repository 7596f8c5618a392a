"""Normalization placement and scaling (docs/methods.md, normalization), each checked against a re-computation."""

import math

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.models.block import placement
from pretrain.models.transformer import build_model, num_params

BASE = dict(vocab_size=61, hidden_size=32, num_layers=4, num_heads=4, ffn_hidden_size=48)


def reference_forward(model, tokens, kind_of, scale_of):
    """The block formulas of docs/methods.md written out again, using the model's own sub-layers."""
    x = model.embed(tokens)
    rope = model.rope(tokens.shape[1], tokens.device)
    for key, b in model.blocks.items():
        i = int(key)
        s, kind = scale_of(i), kind_of(i)
        if kind == "pre":
            h = x + b.attn(s * b.attn_norm(x), rope)
            x = h + b.ffn(s * b.ffn_norm(h))
        elif kind == "post":
            h = s * b.attn_norm(x + b.attn(x, rope))
            x = s * b.ffn_norm(h + b.ffn(h))
        else:  # sandwich
            h = x + s * b.attn_post_norm(b.attn(s * b.attn_norm(x), rope))
            x = h + s * b.ffn_post_norm(b.ffn(s * b.ffn_norm(h)))
    return model.head(model.norm(x))  # the final norm is never scaled


def randomize_norms(model):
    """Non-trivial gains so a formula that skipped a norm would show."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "dyt"])
@pytest.mark.parametrize("placement_kind, scaling", [("pre", "none"), ("pre", "lns"), ("post", "none"),
                                                     ("mix", "none"), ("sandwich", "none"), ("mix", "lns")])
def test_block_formulas_match_recomputation(norm, placement_kind, scaling):
    cfg = ModelConfig(**BASE, norm=norm, norm_placement=placement_kind, norm_scaling=scaling, mix_ln_ratio=0.5)
    model = build_model(cfg, seed=1)
    randomize_norms(model)
    tokens = torch.randint(0, 61, (2, 10))
    mix_boundary = math.floor(0.5 * 4)
    kind_of = {
        "pre": lambda i: "pre", "post": lambda i: "post", "sandwich": lambda i: "sandwich",
        "mix": lambda i: "post" if i < mix_boundary else "pre"}[placement_kind]
    scale_of = (lambda i: 1.0 / math.sqrt(i + 1)) if scaling == "lns" else (lambda i: 1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference_forward(model, tokens, kind_of, scale_of),
                                   rtol=1e-5, atol=1e-5)


def test_lns_is_pre_ln_with_scaled_norm_outputs_from_the_same_weights():
    pre = build_model(ModelConfig(**BASE), seed=3)
    lns = build_model(ModelConfig(**BASE, norm_scaling="lns"), seed=3)
    for (name, a), (_, b) in zip(pre.state_dict().items(), lns.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # scaling adds no parameter and no buffer
    assert [b.scale for b in lns.blocks.values()] == [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5]
    assert all(isinstance(b.scale, float) for b in lns.blocks.values())
    assert not list(lns.buffers())
    tokens = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(pre(tokens), lns(tokens))


@pytest.mark.parametrize("layers, post_blocks", [(12, 3), (24, 6), (4, 1), (1, 0)])
def test_mix_ln_boundary(layers, post_blocks):
    cfg = ModelConfig(**{**BASE, "num_layers": layers}, norm_placement="mix")
    kinds = [placement(cfg, i) for i in range(layers)]
    assert kinds == ["post"] * post_blocks + ["pre"] * (layers - post_blocks)


def test_sandwich_post_norm_gain_is_depth_scaled():
    model = build_model(ModelConfig(**BASE, norm_placement="sandwich"), seed=0)
    gain = model.blocks["2"].ffn_post_norm.weight
    torch.testing.assert_close(gain, torch.full_like(gain, 1 / math.sqrt(2 * 4)))
    torch.testing.assert_close(model.blocks["2"].ffn_norm.weight, torch.ones(32))


def test_dyt_and_layernorm_formulas():
    from pretrain.models.norm import DyT, LayerNorm

    x = torch.randn(3, 32)
    dyt = DyT(32)
    assert dyt.alpha.item() == 0.5
    torch.testing.assert_close(dyt(x), dyt.weight * torch.tanh(0.5 * x) + dyt.bias)
    ln = LayerNorm(32, eps=1e-6)
    torch.testing.assert_close(ln(x), (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False,
                                                                                        keepdim=True) + 1e-6))


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "dyt"])
@pytest.mark.parametrize("where", ["pre", "sandwich"])
def test_parameter_count_formula_per_norm_kind(norm, where):
    cfg = ModelConfig(**BASE, norm=norm, norm_placement=where)
    model = build_model(cfg, seed=0)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
