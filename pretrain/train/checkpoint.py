"""torch.distributed.checkpoint save/load with an atomic commit, retention and auto-resume.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_NNNNNNN/``:
  ``.metadata`` + ``*.distcp``  model and optimizer state (DCP, keyed by global parameter names)
  ``trainer_state.json``       step, consumed samples, tokens (the data position is global), callback states
  ``rng/rank_R.pt``           every rank's RNG states
  ``config.yaml``              the resolved run config, so the directory is self-describing
It is written as ``step_NNNNNNN.tmp`` and renamed only when every rank has finished; a directory
without ``.tmp`` and with both ``.metadata`` and ``trainer_state.json`` is complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pretrain import device as devices
from pretrain.errors import UserError

# A single process saves and loads DCP without a process group; that is intended, not worth a warning.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    return (_STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file()
            and (path / "trainer_state.json").is_file())


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": devices.accelerator_rng_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    devices.set_accelerator_rng_state(state["cuda"])


def save(root: Path, step: int, write: Callable[[Path], None], trainer_state: dict, config_yaml: str,
         keep: int) -> Path:
    """Write a checkpoint atomically on every rank, then drop all but the newest ``keep``. ``write(dir)`` writes
    the model and optimizer state (an engine's ``save_state``, or ``save_dcp`` of a model and optimizer)."""
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    write(tmp)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank()}.pt")
    if _rank() == 0:
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def save_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state as DCP shards under global parameter names (every rank writes its own)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))


def resolve(path: Path) -> Path:
    """A complete step_N directory as given, or the newest complete one of a run directory."""
    if is_complete(path):
        return path
    found = complete_checkpoints(path / "checkpoints") or complete_checkpoints(path)
    if not found:
        raise UserError(f"'{path}' is neither a complete checkpoint (step_NNNNNNN) nor a run directory holding "
                        "one under checkpoints/.")
    return found[-1]


def find_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest complete one for ``auto``, none for ``never``, else the path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise UserError(f"train.resume='{resume}' is not a complete checkpoint directory (step_NNNNNNN holding "
                        ".metadata and trainer_state.json); use train.resume=auto to take the newest one.")
    return path


def read_state(path: Path) -> dict:
    """The trainer state of a complete checkpoint, without loading any tensor."""
    return json.loads((path / "trainer_state.json").read_text())


def load(path: Path, restore: Callable[[Path], None]) -> dict:
    """Restore a run in place: ``restore(path)`` loads model and optimizer (an engine's ``load_state``), then
    this rank's RNG states. Returns the trainer state."""
    restore(path)
    rng_file = path / "rng" / f"rank_{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_state(path)


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, no_dist: bool = False) -> None:
    """Model (and optimizer) state from a checkpoint, resharded to this layout. ``no_dist`` reads without
    collectives, for one process alone while a process group is up (e.g. rank 0 exporting)."""
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    state = {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}
    # DCP keeps one copy of a non-tensor value, so each optimizer group's loaded parameter names are one rank's
    # (under pipeline parallelism another stage's), and torch drops a tied weight those names miss: keep ours.
    names = [list(group["params"]) for group in optim_sd["param_groups"]] if optimizer is not None else []
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        raise UserError(f"checkpoint '{path}' could not be read ({type(e).__name__}: {str(e)[:300]}). It may be "
                        "damaged or from another model shape: point train.resume at an older checkpoint, or "
                        "train.resume=never to start over in a new train.run_dir.") from None
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    else:
        for group, params in zip(state["optim"]["param_groups"], names, strict=True):
            group["params"] = params
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
