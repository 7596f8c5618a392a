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
    if cfg.assembly.phase == "incubate":
        from pretrain.errors import UserError

        raise UserError(f"'{path}' is a checkpoint of module {cfg.assembly.module}'s incubation: it holds that module "
                        "alone, not a whole model. Assemble the model first (`pretrain assemble join CONFIG`); the "
                        "checkpoints under RUN_DIR/join hold all of it.")
    model = build_model(cfg.model, cfg.train.seed, "cpu")
    sg = cfg.model.ffn.self_guided
    if sg.enabled:  # guides and alpha as trained
        set_guided_phase(model, checkpoint.read_state(path)["step"], cfg.guided_steps, sg.reduce_flop)
    # Read without collectives: this is one process's copy, also when a process group is up (rank 0 export).
    checkpoint.load_dcp(path, model, None, no_dist=True)
    return model.eval()
