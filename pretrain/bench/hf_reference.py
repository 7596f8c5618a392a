"""The Hugging Face ``transformers`` model of a config's shape (``LlamaForCausalLM`` or ``MixtralForCausalLM``),
trained by our own engine for ``pretrain bench --against hf``: the same loss, token weighting, gradient
accumulation, clipping and AdamW groups and kernels, so that the two sides differ only in the model.
Imported only by the benchmark: training never loads transformers."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import RunConfig
from pretrain.errors import UserError
from pretrain.models.moe import AttachAux, MoEContext


class HFCausalLM(nn.Module):
    """A transformers causal LM behind our model's call: ``model(tokens, moe=None) -> logits``. Under training
    (a ``MoEContext``), Mixtral's balance loss (its ``router_aux_loss_coef`` times ``aux_loss``) is attached to the
    logits with the context's gradient scale, as our MoE layers attach theirs."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.router_loss_coef = getattr(hf.config, "router_aux_loss_coef", 0.0) if hasattr(
            hf.config, "num_local_experts") else None

    def forward(self, tokens: torch.Tensor, moe: MoEContext | None = None) -> torch.Tensor:
        if self.router_loss_coef is None:
            return self.hf(input_ids=tokens).logits
        out = self.hf(input_ids=tokens, output_router_logits=True)
        if moe is None or not torch.is_grad_enabled():
            return out.logits
        return AttachAux.apply(out.logits, self.router_loss_coef * out.aux_loss, moe.loss_scale)


def hf_model(cfg: RunConfig, device: torch.device) -> HFCausalLM:
    """The ``transformers`` model that computes ours exactly (Llama or Mixtral), randomly initialised."""
    try:
        import transformers
    except ImportError:
        raise UserError("--against hf needs the `transformers` library: pip install -e '.[hf]'.") from None
    from pretrain.convert.hf import architecture
    from pretrain.convert.llama import decoder_config

    m, kind = cfg.model, architecture(cfg.model)
    if m.ffn.kind != "dense" and m.ffn.dense_blocks < m.num_layers:
        raise UserError(f"--against hf has no {m.ffn.kind} FFN to compare with: transformers' Llama would run the dense "
                        "FFN it replaces, other work than ours. Bench it alone (without --against), or compare the "
                        "dense model (model.ffn.kind=dense).")
    common = dict(decoder_config(cfg), use_cache=False, attention_dropout=0.0)
    if kind == "llama":
        config = transformers.LlamaConfig(intermediate_size=m.ffn_size, attention_bias=False, mlp_bias=False,
                                          initializer_range=m.init_std, **common)
    elif kind == "mixtral":
        config = transformers.MixtralConfig(
            intermediate_size=m.moe.expert_ffn_hidden_size or m.ffn_size, num_local_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.top_k, router_aux_loss_coef=m.moe.balance_coef, router_jitter_noise=0.0,
            sliding_window=None, initializer_range=m.init_std, **common)
    else:
        raise UserError(f"--against hf compares with LlamaForCausalLM or MixtralForCausalLM, but this model exports as "
                        f"'{kind}' (norm {m.norm}, placement {m.norm_placement}, ffn {m.ffn.kind}/{m.ffn.activation}, "
                        f"router {m.moe.router}); use a pre-norm RMSNorm SwiGLU model, dense or top-k softmax MoE.")
    torch.manual_seed(cfg.train.seed)
    # fp32 weights (torch's default dtype; the dtype keyword is spelt differently across transformers versions)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return HFCausalLM(model.to(device).train())
