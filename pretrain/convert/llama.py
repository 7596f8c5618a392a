"""Llama adapter: a dense pre-norm RMSNorm + SwiGLU model <-> ``LlamaForCausalLM``.

The decoder part (embedding, attention, norms, head) is shared by every Llama-family adapter (Mixtral,
Qwen2-MoE): our names map one to one, RoPE already uses the rotate-half convention, and LayerNorm Scaling's
1/sqrt(l) is folded into the two norm weights of block l (s * (w * n(x)) = (s * w) * n(x)).

  ours                         Hugging Face
  embed.weight                 model.embed_tokens.weight
  blocks.i.attn_norm.weight    model.layers.i.input_layernorm.weight      (times the LNS scale)
  blocks.i.attn.q_proj.weight  model.layers.i.self_attn.q_proj.weight     (k, v, o alike)
  blocks.i.ffn_norm.weight     model.layers.i.post_attention_layernorm.weight
  blocks.i.ffn.gate_proj       model.layers.i.mlp.gate_proj               (up, down alike)
  norm.weight                  model.norm.weight
  head.weight                  lm_head.weight                             (absent when tied)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.config import ModelConfig, RunConfig
from pretrain.errors import UserError

Tensors = dict[str, torch.Tensor]
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def decoder_to_hf(model: nn.Module) -> Tensors:
    """Everything but the FFNs, in Hugging Face names, with the LNS scale folded into the norms."""
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for key, block in model.blocks.items():
        src, dst = f"blocks.{key}.", f"model.layers.{key}."
        out[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"] * block.scale
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"] * block.scale
        for p in "qkvo":
            out[f"{dst}self_attn.{p}_proj.weight"] = sd[f"{src}attn.{p}_proj.weight"]
    return out


def decoder_from_hf(tensors: Tensors, cfg: ModelConfig) -> Tensors:
    """Our names for everything but the FFNs (an imported model has no LNS, so nothing to unfold)."""
    embed = tensors["model.embed_tokens.weight"]
    out = {"embed.weight": embed, "norm.weight": tensors["model.norm.weight"],
           "head.weight": embed if cfg.tie_embeddings else tensors["lm_head.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "attn_norm.weight"] = tensors[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = tensors[src + "post_attention_layernorm.weight"]
        for p in "qkvo":
            out[f"{dst}attn.{p}_proj.weight"] = tensors[f"{src}self_attn.{p}_proj.weight"]
    return out


def decoder_config(cfg: RunConfig) -> dict[str, Any]:
    """Hugging Face config fields every Llama-family export shares."""
    m = cfg.model
    return dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
                rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                max_position_embeddings=cfg.data.seq_len, hidden_act="silu")


def decoder_model_config(hf: Any) -> dict[str, Any]:
    """Our model fields from a Llama-family Hugging Face config; anything our model cannot compute exactly
    (biases, scaled RoPE, another head size or activation) is refused with the reason."""
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    window = getattr(hf, "sliding_window", None)
    problems = [
        (rope.get("rope_type", rope.get("type", "default")) != "default", f"RoPE scaling {rope}"),
        (theta is None, "no rope_theta"),
        (head_dim * hf.num_attention_heads != hf.hidden_size,
         f"head_dim {head_dim} x {hf.num_attention_heads} heads != hidden_size {hf.hidden_size}"),
        (getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False), "linear biases"),
        (getattr(hf, "hidden_act", "silu") != "silu", f"activation {getattr(hf, 'hidden_act', None)}"),
        (window is not None, f"sliding-window attention ({window})"),
    ]
    found = [what for bad, what in problems if bad]
    if found:
        raise UserError(f"this {hf.model_type} checkpoint uses {', '.join(found)}, which our model does not "
                        "compute; only plain Llama/Mixtral layouts (RoPE without scaling, no biases, SwiGLU, "
                        "full attention) can be imported.")
    return dict(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
                num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
                rope_theta=float(theta), norm_eps=float(hf.rms_norm_eps),
                tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))


# ---- LlamaForCausalLM ----------------------------------------------------------------------------------
def export(cfg: RunConfig, model: nn.Module) -> tuple[Any, Tensors]:
    from transformers import LlamaConfig

    tensors = decoder_to_hf(model)
    for key, block in model.blocks.items():
        for proj in PROJECTIONS:
            tensors[f"model.layers.{key}.mlp.{proj}.weight"] = getattr(block.ffn, proj).weight
    config = LlamaConfig(architectures=["LlamaForCausalLM"], intermediate_size=cfg.model.ffn_size,
                         attention_bias=False, mlp_bias=False, **decoder_config(cfg))
    return config, tensors


def import_model(hf: Any, tensors: Tensors) -> tuple[ModelConfig, Tensors]:
    cfg = ModelConfig(ffn_hidden_size=hf.intermediate_size, **decoder_model_config(hf))
    sd = decoder_from_hf(tensors, cfg)
    for i in range(cfg.num_layers):
        for proj in PROJECTIONS:
            sd[f"blocks.{i}.ffn.{proj}.weight"] = tensors[f"model.layers.{i}.mlp.{proj}.weight"]
    return cfg, sd
