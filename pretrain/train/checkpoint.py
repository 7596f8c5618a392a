"""torch.distributed.checkpoint save/load with an atomic commit, retention and auto-resume.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_NNNNNNN/``:
  ``.metadata`` + ``*.distcp``  model and optimizer state (DCP, keyed by global parameter names)
  ``trainer_state.json``       step, consumed samples, tokens (the data position is global), callback states
  ``rng/rank_R.pt``           every rank's RNG states (tensors and numbers only)
  ``config.yaml``              the resolved run config, so the directory is self-describing
It is written as ``step_NNNNNNN.tmp`` and renamed only when every rank has finished; a directory
without ``.tmp`` and with both ``.metadata`` and ``trainer_state.json`` is complete. Loading never unpickles
anything but data (``safe_load.py``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pretrain.errors import UserError
from pretrain.train import faults
from pretrain.train.safe_load import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    load_rng_file,
    read_dcp_metadata,
    rng_state,
    set_rng_state,
)

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


def incomplete_checkpoints(root: Path) -> list[tuple[Path, str]]:
    """Checkpoint directories (not ``.tmp``) that lack a file every complete one has, with the missing file."""
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and _STEP_DIR.match(p.name):
            missing = [name for name in (".metadata", "trainer_state.json") if not (p / name).is_file()]
            if missing:
                found.append((p, missing[0]))
    return found


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save(root: Path, step: int, write: Callable[[Path], None], trainer_state: dict, config_yaml: str,
         keep: int, single_process: bool = False) -> Path:
    """Write a checkpoint atomically on every rank, then drop all but the newest ``keep``. ``write(dir)`` writes
    the model and optimizer state (an engine's ``save_state``, or ``save_dcp`` of a model and optimizer). The size
    and SHA-256 of every file go to ``integrity.json`` (each rank hashes a share). A write that fails (a full
    disk, a read-only directory) leaves the earlier checkpoints as they were and names the directory.
    ``single_process``: one process writes the whole checkpoint while the others wait elsewhere (no collectives)."""
    rank = 0 if single_process else _rank()
    sync = (lambda: None) if single_process else _barrier
    final = root / f"step_{step:07d}"
    tmp = root / f"step_{step:07d}.tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        sync()
        faults.reached("save.begin", step)
        write(tmp)
        faults.reached("save.after_shards", step)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")  # tensors and numbers: safe to load
        if rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
        sync()
        files = _digests(tmp, share=False) if single_process else _gather(_digests(tmp, share=True))
        if rank == 0:
            (tmp / INTEGRITY).write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1) + "\n")
    except (OSError, RuntimeError, CheckpointException) as e:
        errors = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        os_error = next((exc for exc in errors if isinstance(exc, OSError)), None)
        # torch's file writer reports a short write of a full disk as a RuntimeError ("unexpected pos"), so ask
        # the disk too.
        full = (os_error is not None and os_error.errno == errno.ENOSPC) or shutil.disk_usage(root).free < 1 << 20
        if not full and os_error is None:
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = complete_checkpoints(root)
        what = "no space left on the device" if full else f"{os_error.strerror or os_error}"
        raise UserError(f"could not write checkpoint '{tmp}': {what}. "
                        f"{f'The newest complete checkpoint, {kept[-1]}, is intact. ' if kept else ''}"
                        "Free space or give train.run_dir a writable place with room, then run again "
                        "(train.resume=auto continues from the newest checkpoint).") from None
    sync()
    faults.reached("save.before_rename", step)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        faults.reached("save.after_rename", step)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    sync()
    return final


INTEGRITY = "integrity.json"


def _digests(directory: Path, share: bool) -> dict[str, dict]:
    """{relative path: size and SHA-256} of the files under ``directory`` (with ``share``, this rank's share)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != INTEGRITY)
    if share and dist.is_initialized():
        files = files[dist.get_rank()::dist.get_world_size()]
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _gather(part: dict) -> dict:
    if not dist.is_initialized():
        return part
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def damage(path: Path, checksums: bool = True) -> str | None:
    """What is wrong with a complete checkpoint, or None when every file ``integrity.json`` lists is there with its
    size (and, with ``checksums``, its SHA-256; each rank reads a share). The same answer on every rank."""
    manifest_file = path / INTEGRITY
    problem = None
    if manifest_file.is_file():
        try:
            listed = json.loads(manifest_file.read_text())["files"]
        except (ValueError, KeyError):
            listed, problem = {}, f"{manifest_file} is not a valid integrity record"
        names = sorted(listed)
        mine = names[_rank()::dist.get_world_size()] if dist.is_initialized() else names
        for name in names:
            file = path / name
            if not file.is_file():
                problem = problem or f"{file} is missing"
            elif file.stat().st_size != listed[name]["size"]:
                problem = problem or (f"{file} has {file.stat().st_size} bytes, {listed[name]['size']} were written "
                                      "(truncated or replaced)")
            elif checksums and name in mine and _sha256(file) != listed[name]["sha256"]:
                problem = problem or f"{file} does not hold the bytes that were written (its SHA-256 differs)"
    if dist.is_initialized():
        found: list = [None] * dist.get_world_size()
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    return problem


Names = Callable[[str], "str | None"]  # a model tensor's name in the checkpoint, or None: not kept there


def _renamed(state: dict, names: Names | None) -> dict:
    if names is None:
        return state
    return {new: value for name, value in state.items() if (new := names(name)) is not None}


def save_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, no_dist: bool = False,
             names: Names | None = None) -> None:
    """Model and optimizer state as DCP shards under global parameter names (every rank writes its own; with
    ``no_dist`` this one process writes all, without collectives). ``names`` keeps some model tensors, under the
    names it gives them (an incubation keeps its module under the target model's names)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    model_sd = _renamed(model_sd, names)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory), no_dist=no_dist)


def save_states(directory: Path, state: dict) -> None:
    """Write a state dict of whole tensors (each key on the rank that holds it; a key on several ranks is written
    once), in the layout ``save_dcp`` writes: an engine that assembles its own tensors (DeepSpeed) uses it."""
    dcp.save(state, checkpoint_id=str(directory))


def saved_keys(path: Path) -> set[str]:
    """The flattened keys (``model.NAME``, ``optim.state.NAME.exp_avg``, ...) a checkpoint holds."""
    return set(read_dcp_metadata(path / ".metadata").state_dict_metadata)


def load_states(path: Path, state: dict) -> dict:
    """Read ``state`` (a nested dict of tensors to fill, every key present in the checkpoint) in place."""
    _read(path, state, no_dist=False)
    return state


def _read(path: Path, state: dict, no_dist: bool) -> None:
    try:
        read_dcp_metadata(path / ".metadata")  # refused here, with its own message, before DCP reads anything
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)
    except UserError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
        raise UserError(f"checkpoint '{path}' could not be read ({_reason(e)}); it may be damaged or written by "
                        "another model shape: use an older checkpoint of the run (its step_NNNNNNN directory).") from None


def _reason(error: BaseException) -> str:
    """The last line of what went wrong, without the tracebacks DCP folds into its exceptions' text."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("Traceback", "File ", "(RANK", "^", "~"))]
    return f"{type(error).__name__}: {(lines[-1] if lines else '')[:240]}"


def model_differences(path: Path, model: dict) -> list[str]:
    """``model.KEY: saved -> given`` for every model key in which the checkpoint's recorded config differs from
    ``model`` (a config's ``to_dict()["model"]``); empty when the checkpoint records no config."""
    import yaml

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text()).get("model")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return []  # (no readable record: the load failure stays the damage it looks like)
    if not isinstance(saved, dict):
        return []

    def flat(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved, "model."), flat(model, "model.")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def resolve(path: Path) -> Path:
    """A complete step_N directory as given, or the newest complete one of a run directory."""
    if is_complete(path):
        return path
    found = complete_checkpoints(path / "checkpoints") or complete_checkpoints(path)
    if not found:
        raise UserError(f"'{path}' is neither a complete checkpoint (step_NNNNNNN) nor a run directory holding "
                        "one under checkpoints/.")
    return found[-1]


def prepare_run_dir(run_dir: Path, resume: str) -> None:
    """Before a run starts in ``run_dir``: ``never`` refuses a directory that holds checkpoints (the new run's
    would be deleted by retention as older ones, and its metrics mixed with the old run's); ``overwrite`` clears
    the checkpoints and logs of the earlier run."""
    found = complete_checkpoints(run_dir / "checkpoints")
    if resume == "never" and found:
        raise UserError(f"train.resume=never, but '{run_dir}' already holds a run (newest checkpoint {found[-1].name}). "
                        "Start the new run elsewhere (train.run_dir=...), continue the old one (train.resume=auto), or "
                        "replace it (train.resume=overwrite deletes its checkpoints and logs).")
    for stale in (run_dir / "checkpoints").glob("step_*.tmp"):  # a save that was killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    if resume == "overwrite":
        for name in ("checkpoints", "tensorboard", "profile"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "preempted"):
            (run_dir / name).unlink(missing_ok=True)


def resume_candidates(root: Path, resume: str) -> list[Path]:
    """The checkpoints to try, in order: for ``auto`` every complete one, newest first; the given one; none."""
    if resume in ("never", "overwrite"):
        return []
    if resume == "auto":
        return complete_checkpoints(root)[::-1]
    return [find_resume(root, resume)]


def find_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest complete one for ``auto``, none for ``never``, else the path."""
    if resume in ("never", "overwrite"):
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        inside = complete_checkpoints(path / "checkpoints") or complete_checkpoints(path)
        if inside:  # a run directory, or its checkpoints/ folder
            raise UserError(f"train.resume='{resume}' is a run directory; give one of its checkpoints, e.g. the "
                            f"newest: train.resume={inside[-1]} (or train.resume=auto when this run's own "
                            "train.run_dir is that directory).")
        raise UserError(f"train.resume='{resume}' is not a complete checkpoint directory (step_NNNNNNN holding "
                        ".metadata and trainer_state.json); use train.resume=auto to take the newest one of this "
                        "run's train.run_dir.")
    return path


def read_state(path: Path) -> dict:
    """The trainer state of a complete checkpoint, without loading any tensor."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint '{path}' has an unreadable trainer_state.json ({type(e).__name__}: {e}); it is "
                        "damaged: use an older checkpoint of the run (its step_NNNNNNN directory).") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"checkpoint '{path}' has a trainer_state.json without its step; it is damaged: use an older "
                        "checkpoint of the run (its step_NNNNNNN directory).")
    return state


def load(path: Path, restore: Callable[[Path], None]) -> dict:
    """Restore a run in place: ``restore(path)`` loads model and optimizer (an engine's ``load_state``), then
    this rank's RNG states. Returns the trainer state."""
    restore(path)
    rng_file = path / "rng" / f"rank_{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(load_rng_file(rng_file))
    return read_state(path)


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, no_dist: bool = False,
             names: Names | None = None) -> None:
    """Model (and optimizer) state from a checkpoint, resharded to this layout. ``no_dist`` reads without
    collectives, for one process alone while a process group is up (e.g. rank 0 exporting). ``names``: the model
    tensors to read and their names in the checkpoint, as ``save_dcp`` (the others keep their values)."""
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (
        get_state_dict(model, [])[0], None)
    ours = {} if names is None else {new: name for name in model_sd if (new := names(name)) is not None}
    model_sd = _renamed(model_sd, names)
    state = {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}
    # DCP keeps one copy of a non-tensor value, so each optimizer group's loaded parameter names are one rank's
    # (under pipeline parallelism another stage's), and torch drops a tied weight those names miss: keep ours.
    group_params = [list(group["params"]) for group in optim_sd["param_groups"]] if optimizer is not None else []
    _read(path, state, no_dist)
    if names is not None:  # back to the model's own names
        state["model"] = {ours[name]: value for name, value in state["model"].items()}
    options = StateDictOptions(strict=names is None)  # (with ``names``, the other tensors keep their values)
    if optimizer is None:
        if state["model"]:  # (a pipeline rank may hold none of the tensors ``names`` picks)
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={}, options=options)
    else:
        for group, params in zip(state["optim"]["param_groups"], group_params, strict=True):
            group["params"] = params
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
