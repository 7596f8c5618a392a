"""Custom-code export: any model the stock transformers architectures cannot represent exactly (post, Mix-LN
and sandwich placement, LayerNorm or DyT, GELU, kept-structured FFNs, noisy top-k or hash routing, a capacity
limit, GELU or structured experts) is written with ``modeling_pretrain.py``, a self-contained copy of our
forward, and an ``auto_map`` in config.json that points ``AutoConfig`` / ``AutoModelForCausalLM`` at it.

Tensor names are ours unchanged, with three differences: the head is left out when tied (the modeling code
uses the embedding), pre-merged structured experts are stacked like dense ones (``w_gate/w_up/w_down``), and
each hash-routed layer stores the training run's routing table as ``blocks.i.ffn.router.table``, so the
exported model routes every token id to exactly the experts it was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import RunConfig
from pretrain.convert.llama import Tensors
from pretrain.convert.mixtral import stacked_experts

MODELING_FILE = Path(__file__).with_name("modeling_pretrain.py")
AUTO_MAP = {"AutoConfig": "modeling_pretrain.PretrainConfig",
            "AutoModelForCausalLM": "modeling_pretrain.PretrainForCausalLM"}


def export(cfg: RunConfig, model: nn.Module, keep_structured: bool) -> tuple[Any, Tensors]:
    from pretrain.convert.modeling_pretrain import PretrainConfig

    m = cfg.model
    tensors = dict(model.state_dict())
    if m.tie_embeddings:
        del tensors["head.weight"]
    for key, block in model.blocks.items():
        prefix = f"blocks.{key}.ffn."
        if block.is_moe and block.ffn.experts is not None and not keep_structured:
            for name in [n for n in tensors if n.startswith(prefix + "experts.")]:
                del tensors[name]
            tensors.update({f"{prefix}w_{kind}": w for kind, w in stacked_experts(block.ffn).items()})
        if block.is_moe and m.moe.router == "hash":
            tensors[prefix + "router.table"] = block.ffn.router.table(torch.device("cpu"))
    blocks = list(model.blocks.values())
    config = PretrainConfig(
        architectures=["PretrainForCausalLM"], auto_map=AUTO_MAP, vocab_size=m.vocab_size,
        hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.kv_heads, rope_theta=m.rope_theta, norm=m.norm, norm_eps=m.norm_eps,
        layer_placements=[b.placement for b in blocks], layer_scales=[b.scale for b in blocks],
        tie_embeddings=m.tie_embeddings, activation=m.ffn.activation, intermediate_size=m.ffn_size,
        ffn_kind=m.ffn.kind if keep_structured else "dense", ffn_rank=m.ffn.rank, ffn_blocks=m.ffn.blocks,
        ffn_dense_blocks=m.ffn.dense_blocks, moe_layers=[b.layer_idx for b in blocks if b.is_moe],
        num_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, router=m.moe.router,
        capacity_factor=m.moe.capacity_factor, num_shared_experts=m.moe.num_shared_experts,
        expert_intermediate_size=m.moe.expert_ffn_hidden_size or m.ffn_size, max_position_embeddings=cfg.data.seq_len)
    return config, tensors
