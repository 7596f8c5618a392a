"""The Llama-style model: causality, parameter and FLOP counts from the config, init by global name."""

import json

import torch

from pretrain.config import ModelConfig
from pretrain.models.transformer import build_model, flops_per_token, num_params

CFG = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48)


def test_changing_token_t_changes_no_logit_before_t():
    model = build_model(ModelConfig(**CFG), seed=0)
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 97)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_parameter_count_from_config_matches_module():
    for tie in (False, True):
        cfg = ModelConfig(**CFG, tie_embeddings=tie)
        model = build_model(cfg, seed=0)
        assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_is_six_n_plus_attention():
    cfg = ModelConfig(**CFG)
    d, L, V, f, kv = 32, 3, 97, 48, 16
    matmul = L * (2 * d * d + 2 * d * kv + 3 * d * f) + V * d
    assert flops_per_token(cfg, 16) == 6 * matmul + 12 * L * 16 * d


def test_init_depends_only_on_seed_and_global_name():
    deep = build_model(ModelConfig(**CFG), seed=7)
    shallow = build_model(ModelConfig(**{**CFG, "num_layers": 1}), seed=7)
    other_seed = build_model(ModelConfig(**CFG), seed=8)
    deep_sd, shallow_sd = deep.state_dict(), shallow.state_dict()
    for name, tensor in shallow_sd.items():
        assert torch.equal(tensor, deep_sd[name]), name
    assert not torch.equal(deep_sd["blocks.0.attn.q_proj.weight"], other_seed.state_dict()["blocks.0.attn.q_proj.weight"])
    w = deep_sd["blocks.2.ffn.down_proj.weight"]
    assert abs(w.std().item() - 0.02) < 0.003
    assert torch.equal(deep_sd["blocks.1.attn_norm.weight"], torch.ones(32))


def test_blocks_are_keyed_by_global_index():
    model = build_model(ModelConfig(**CFG), seed=0)
    assert list(model.blocks.keys()) == ["0", "1", "2"]
    assert [b.layer_idx for b in model.blocks.values()] == [0, 1, 2]


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build_model(ModelConfig(**CFG), seed=3)
    mha = build_model(ModelConfig(**{**CFG, "num_kv_heads": 4}), seed=3)
    sd = gqa.state_dict()
    for i in range(3):
        for proj in ("k_proj", "v_proj"):
            w = sd[f"blocks.{i}.attn.{proj}.weight"].view(2, 8, 32)
            sd[f"blocks.{i}.attn.{proj}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_shape_keys_are_exactly_the_keys_that_change_weight_shapes():
    """model.SHAPE_KEYS decides whether a checkpoint that will not load holds another model (a refusal naming
    the keys) or is damaged: every other model key, changed, must leave every weight's shape alone, and each
    shape key must change one. (pad_vocab_multiple shapes the embedding only through the tokenizer's size.)"""
    import dataclasses
    import typing

    from pretrain.config import ConfigError, from_dict
    from pretrain.config.model import SHAPE_KEYS

    bases = [{"vocab_size": 97, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "ffn_hidden_size": 48, **extra} for extra in (
        {"moe": {"num_experts": 4, "top_k": 2}},
        {"ffn": {"kind": "lowrank", "rank": 8, "self_guided": {"enabled": True}}},
        {"ffn": {"kind": "blockshuffle", "blocks": 2}})]

    def leaves(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from leaves(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", hints[f.name]

    def shapes(model: dict) -> dict:
        return {n: p.shape for n, p in build_model(from_dict({"model": model}).validate().model, 0).named_parameters()}

    def changed(model: dict, key: str, value) -> dict:
        out = json.loads(json.dumps(model))
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
        return out

    def alternatives(tp, value):
        if typing.get_origin(tp) is typing.Literal:
            return [v for v in typing.get_args(tp) if v != value]
        if tp is bool:
            return [not value]
        if tp is int:
            return [value * 2 or 1, value + 1]
        return [value * 0.5 or 0.5]

    keys = dict(leaves(ModelConfig))
    assert SHAPE_KEYS <= keys.keys(), SHAPE_KEYS - keys.keys()
    shaping = set()
    for base in bases:
        reference, resolved = shapes(base), from_dict({"model": base}).model
        for key, tp in keys.items():
            value = resolved
            for part in key.split("."):
                value = getattr(value, part)
            for alt in alternatives(tp, value):
                try:
                    other = shapes(changed(base, key, alt))
                except ConfigError:
                    continue
                if other != reference:
                    shaping.add(key)
    assert shaping == SHAPE_KEYS - {"pad_vocab_multiple"}
