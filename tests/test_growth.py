"""Growth operators: stacked and interpolated weights land where they should, the function-preserving operators
(zero depth growth, width growth, sparse upcycling) leave the logits unchanged for every model kind they accept,
and the ones that cannot hold refuse with the reason."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pretrain.config import FFNConfig, ModelConfig, MoEConfig, SelfGuidedConfig
from pretrain.growth.operators import GrowthError, depth_map, grow_depth, grow_width, upcycle
from pretrain.models.structured import guided_layers
from pretrain.models.transformer import build_model

BASE = ModelConfig(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48)
KINDS = {
    "dense": BASE,
    "lns": replace(BASE, norm_scaling="lns"),
    "sandwich_layernorm": replace(BASE, norm_placement="sandwich", norm="layernorm"),
    "dyt": replace(BASE, norm="dyt"),
    "lowrank": replace(BASE, ffn=FFNConfig(kind="lowrank", rank=8)),
    "blockdense": replace(BASE, ffn=FFNConfig(kind="blockdense", rank=8, blocks=2)),
    "self_guided": replace(BASE, ffn=FFNConfig(kind="lowrank", rank=8, self_guided=SelfGuidedConfig(enabled=True))),
    "moe": replace(BASE, moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1)),
    "moe_noisy": replace(BASE, moe=MoEConfig(num_experts=4, top_k=2, router="noisy_topk")),
    "moe_hash": replace(BASE, moe=MoEConfig(num_experts=4, top_k=2, router="hash")),
}


def trained_like(cfg: ModelConfig, seed: int = 0):
    """A model whose every tensor is moved off its init (norm gains, zero-initialised gates...), in eval mode."""
    model = build_model(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    for layer in guided_layers(model):
        layer.alpha = 0.3
    return model.eval()


def logits(cfg: ModelConfig, state: dict, tokens: torch.Tensor) -> torch.Tensor:
    model = build_model(cfg, 0)
    model.load_state_dict(state, strict=True)
    for layer in guided_layers(model):
        layer.alpha = 0.3
    with torch.no_grad():
        return model.eval()(tokens)


TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def test_depth_maps():
    assert depth_map("stack", 3, 9) == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert depth_map("stack", 6, 16) == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]  # stacked, then cut
    assert depth_map("interpolate", 3, 6) == [0, 0, 1, 1, 2, 2]
    assert depth_map("zero", 3, 6) == [0, None, 1, None, 2, None]
    assert depth_map("random", 2, 5) == [0, None, None, 1, None]
    with pytest.raises(GrowthError, match="fewer"):
        depth_map("stack", 6, 4)


@pytest.mark.parametrize("op", ["stack", "interpolate"])
def test_copied_blocks_hold_the_source_blocks_in_order(op):
    source = trained_like(BASE).state_dict()
    grown = grow_depth(source, BASE, op, factor=2)
    order = depth_map(op, 3, 6)
    assert grown.cfg.num_layers == 6
    for name, tensor in grown.state.items():
        if name.startswith("blocks."):
            j, rest = name.split(".", 2)[1:]
            key = f"blocks.{order[int(j)]}.{rest}"
        else:
            key = name
        assert torch.equal(tensor, source[key]) and grown.origin[name] == (key, 1.0)
        assert tensor.data_ptr() != source[key].data_ptr()  # cloned, not shared
    logits(grown.cfg, grown.state, TOKENS)  # loads into the 6-block model


def test_explicit_layer_map_and_random_new_blocks_from_init():
    source = trained_like(BASE).state_dict()
    grown = grow_depth(source, BASE, "random", layers=[2, None, 0, 0])
    fresh = build_model(grown.cfg, 7).state_dict()
    again = grow_depth(source, BASE, "random", layers=[2, None, 0, 0], seed=7)
    assert torch.equal(grown.state["blocks.0.attn.q_proj.weight"], source["blocks.2.attn.q_proj.weight"])
    assert torch.equal(again.state["blocks.1.ffn.up_proj.weight"], fresh["blocks.1.ffn.up_proj.weight"])
    assert grown.origin["blocks.1.ffn.up_proj.weight"] is None
    with pytest.raises(GrowthError, match="source blocks"):
        grow_depth(source, BASE, "stack", layers=[0, 5])


@pytest.mark.parametrize("kind", ["dense", "lns", "sandwich_layernorm", "dyt", "lowrank", "self_guided", "moe",
                                  "moe_hash"])
def test_zero_depth_growth_keeps_the_logits(kind):
    cfg = KINDS[kind]
    source = trained_like(cfg)
    grown = grow_depth(source.state_dict(), cfg, "zero", num_layers=7)
    expected = source(TOKENS)
    torch.testing.assert_close(logits(grown.cfg, grown.state, TOKENS), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("placement", ["post", "mix"])
def test_zero_growth_of_post_norm_blocks_is_refused(placement):
    cfg = replace(BASE, norm_placement=placement, num_layers=4)
    with pytest.raises(GrowthError, match="post-norm"):
        grow_depth(build_model(cfg, 0).state_dict(), cfg, "zero", factor=2)


@pytest.mark.parametrize("kind", ["dense", "lns", "sandwich_layernorm", "dyt", "lowrank", "blockdense", "self_guided",
                                  "moe", "moe_noisy", "moe_hash"])
@pytest.mark.parametrize("hidden_factor,ffn_size", [(2, None), (1, 80), (2, 96)])
def test_width_growth_keeps_the_logits(kind, hidden_factor, ffn_size):
    cfg = KINDS[kind]
    if kind == "blockdense" and ffn_size == 80:
        ffn_size = 96  # block-dense layers need a multiple
    source = trained_like(cfg)
    grown = grow_width(source.state_dict(), cfg, hidden_factor, ffn_size)
    assert grown.cfg.hidden_size == cfg.hidden_size * hidden_factor
    assert grown.cfg.head_dim == cfg.head_dim and grown.cfg.ffn_size == (ffn_size or cfg.ffn_size)
    torch.testing.assert_close(logits(grown.cfg, grown.state, TOKENS), source(TOKENS), rtol=1e-4, atol=1e-5)


def test_width_growth_refuses_what_cannot_hold():
    tied = replace(BASE, tie_embeddings=True)
    with pytest.raises(GrowthError, match="untie"):
        grow_width(build_model(tied, 0).state_dict(), tied, 2)
    shuffle = replace(BASE, ffn=FFNConfig(kind="blockshuffle", blocks=2))
    with pytest.raises(GrowthError, match="block-shuffle"):
        grow_width(build_model(shuffle, 0).state_dict(), shuffle, 2)
    blockdense = KINDS["blockdense"]
    with pytest.raises(GrowthError, match="multiple of 48"):
        grow_width(build_model(blockdense, 0).state_dict(), blockdense, 1, 80)


@pytest.mark.parametrize("router", ["topk_softmax", "noisy_topk", "hash"])
@pytest.mark.parametrize("ffn", ["dense", "lowrank"])
@pytest.mark.parametrize("shared,every_n", [(0, 1), (1, 2)])
def test_upcycling_keeps_the_logits(router, ffn, shared, every_n):
    cfg = KINDS[ffn]
    source = trained_like(cfg)
    moe = MoEConfig(num_experts=4, top_k=2, router=router, num_shared_experts=shared, every_n=every_n)
    grown = upcycle(source.state_dict(), cfg, moe)
    assert grown.cfg.moe.num_experts == 4
    torch.testing.assert_close(logits(grown.cfg, grown.state, TOKENS), source(TOKENS), rtol=1e-4, atol=1e-5)
    if ffn == "dense":
        copies = grown.state["blocks.1.ffn.w_up"]
        assert all(torch.equal(copies[e], source.state_dict()["blocks.1.ffn.up_proj.weight"]) for e in range(4))


def test_upcycling_refuses_dropping_tokens_and_other_widths():
    state = build_model(BASE, 0).state_dict()
    with pytest.raises(GrowthError, match="capacity_factor"):
        upcycle(state, BASE, MoEConfig(num_experts=4, capacity_factor=1.0))
    with pytest.raises(GrowthError, match="width"):
        upcycle(state, BASE, MoEConfig(num_experts=4, expert_ffn_hidden_size=64))
    moe = KINDS["moe"]
    with pytest.raises(GrowthError, match="already"):
        upcycle(build_model(moe, 0).state_dict(), moe, MoEConfig(num_experts=8))
