"""Plain nn.Module models: no process groups, no DTensor, no device assumptions (docs/architecture.md, rule 1)."""

from pretrain.models.transformer import Transformer, build_model, init_weights

__all__ = ["Transformer", "build_model", "init_weights"]
