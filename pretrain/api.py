"""Python API for trained models."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_model(checkpoint_dir: str | Path) -> nn.Module:
    """The trained model in eval mode on CPU, from a checkpoint directory (``.../checkpoints/step_N``)
    or a run directory (its newest complete checkpoint). Call it on (batch, seq) token ids for logits."""
    from pretrain.config import load_config
    from pretrain.models.structured import set_guided_phase
    from pretrain.models.transformer import build_model
    from pretrain.train import checkpoint

    path = checkpoint.resolve(Path(checkpoint_dir))
    cfg = load_config(path / "config.yaml")
    model = build_model(cfg.model, cfg.train.seed, "cpu")
    sg = cfg.model.ffn.self_guided
    if sg.enabled:  # guides and alpha as trained
        set_guided_phase(model, checkpoint.read_state(path)["step"], cfg.guided_steps, sg.reduce_flop)
    # Read without collectives: this is one process's copy, also when a process group is up (rank 0 export).
    checkpoint.load_dcp(path, model, None, no_dist=True)
    return model.eval()
