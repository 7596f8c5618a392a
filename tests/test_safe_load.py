"""A checkpoint never runs code: a crafted pickle in each place a checkpoint holds one is refused by name, and
the command it carries never runs (resume, ``load_model``, export)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

import pretrain
from pretrain.errors import UserError
from pretrain.train import checkpoint
from pretrain.train.trainer import Trainer, run_training


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def quiet(*_a, **_k):
    pass


@pytest.fixture
def trained(tiny_cfg, tmp_path):
    """A real two-step run, its checkpoint, and a marker file the payloads would create."""
    cfg = tiny_cfg("train.max_steps=2", "checkpoint.interval=2", "train.eval_interval=0")
    run_training(cfg, log=quiet)
    step = Path(cfg.train.run_dir) / "checkpoints" / "step_0000002"
    return cfg, step, tmp_path / "pwned"


def forge_integrity(step: Path) -> None:
    """What an attacker would do too: record the crafted files' sizes and digests, so the integrity check passes and
    the loaders themselves must refuse them."""
    import hashlib
    import json

    files = {str(p.relative_to(step)): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(step.rglob("*")) if p.is_file() and p.name != "integrity.json"}
    (step / "integrity.json").write_text(json.dumps({"files": files}))


def attempts(cfg, step: Path):
    """Every way a user loads a checkpoint: resume, the Python API, the Hugging Face export."""
    from pretrain.convert.hf import export_checkpoint

    yield lambda: Trainer(cfg.replace(train={"resume": str(step), "run_dir": str(step.parents[2] / "again")}), log=quiet)
    yield lambda: pretrain.load_model(step)
    yield lambda: export_checkpoint(step, step.parents[2] / "hf")


def test_crafted_dcp_metadata_is_refused_by_name(trained):
    cfg, step, marker = trained
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    forge_integrity(step)
    for attempt in attempts(cfg, step):
        with pytest.raises(UserError, match="system"):
            attempt()
    assert not marker.exists()


def test_crafted_value_inside_the_shards_is_refused(trained):
    cfg, step, marker = trained
    trainer = Trainer(cfg.replace(train={"run_dir": str(step.parents[2] / "source")}), log=quiet)
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    optim_sd["param_groups"][0]["lr"] = Payload(marker)  # a non-tensor value DCP stores with torch.save
    for old in step.glob("*.distcp"):
        old.unlink()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(step))
    forge_integrity(step)
    with pytest.raises(UserError, match="could not be read"):
        Trainer(cfg.replace(train={"resume": str(step), "run_dir": str(step.parents[2] / "again")}), log=quiet)
    assert not marker.exists()


def test_crafted_rng_file_is_refused(trained):
    cfg, step, marker = trained
    torch.save({"torch": Payload(marker)}, step / "rng" / "rank_0.pt")
    forge_integrity(step)
    with pytest.raises(UserError, match="RNG states"):
        Trainer(cfg.replace(train={"resume": str(step), "run_dir": str(step.parents[2] / "again")}), log=quiet)
    assert not marker.exists()


def test_rng_files_hold_only_tensors_and_numbers(trained):
    cfg, step, _ = trained
    state = torch.load(step / "rng" / "rank_0.pt", weights_only=True)  # raises if anything else is inside
    assert set(state) == {"torch", "numpy", "python", "cuda"}
    assert checkpoint.read_state(step)["step"] == 2
