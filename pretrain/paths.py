"""Paths a user gives: checked before anything is written or computed, with the key to change in the message."""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from pathlib import Path

from pretrain.errors import UserError


def require_writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` as a directory if needed and make sure files can be written there; ``what`` names the key or
    option that gave it (e.g. ``train.run_dir``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file, not a directory; point {what} at a directory (it is created "
                        "when missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be written ({e.strerror or e}); point {what} at a directory you can "
                        "write to.") from None
    return path


def require_writable_file(path: str | Path, what: str) -> Path:
    """The directory of an output file must be writable (checked before the work that produces the file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a directory; give the path of a file.")
    require_writable_dir(path.parent if str(path.parent) else Path("."), f"the directory of {what}")
    return path


# What a run writes in its directory (pretrain train, import, the experiments' done.json): one of them makes a
# directory a run's.
RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", "checkpoints", "data_index", "tensorboard", "profile", "hf",
                         "user_error", "preempted", "done.json"})


class ForeignRunDir(UserError):
    """train.run_dir holds other files and no run (nothing may be written there, not even the error marker)."""


def require_run_dir(cfg) -> None:
    """``cfg.train.run_dir``: a new or empty directory, or one a run wrote. A directory of other files is refused:
    the run would write its config.yaml, metrics and checkpoints among them (and train.resume=overwrite deletes
    some). Not other files: YAML configs, and what the run makes itself that may lie there (its tokenizer and token
    files, whose names start as tokenizer.path's and data.prefix's)."""
    path = Path(cfg.train.run_dir)
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        own = tuple(Path(p).name for p in (cfg.tokenizer.path, cfg.data.prefix)
                    if Path(p).resolve().parent == path.resolve())
        entries = sorted(n for n in names if not n.startswith((".", *own)) and not n.endswith((".yaml", ".yml")))
        if entries and not RUN_ENTRIES & names:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ForeignRunDir(f"train.run_dir '{path}' holds other files ({shown}) and no run: a run writes its "
                                "config.yaml, metrics.jsonl and checkpoints/ there. Give a new or empty directory, "
                                f"e.g. train.run_dir={path / 'run'}.")


@contextlib.contextmanager
def new_dir(path: str | Path, what: str):
    """``require_writable_dir`` for the work of a with-block that fills the directory: when the block fails, the
    directories this call created are removed again if they are still empty, so a failed command leaves nothing."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # the deepest first
    out = require_writable_dir(path, what)
    try:
        yield out
    except BaseException:
        for made in created:
            try:
                made.rmdir()
            except OSError:  # not empty (or not ours to remove): keep it and what is above it
                break
        raise


# The run directories this process holds: (st_dev, st_ino) -> its live lock (an entry goes with its lock).
_HELD: weakref.WeakValueDictionary[tuple[int, int], RunDirLock] = weakref.WeakValueDictionary()


class RunDirLock:
    """One run at a time in a run directory: an exclusive ``flock`` on RUN_DIR/.lock held while the lock object
    lives (the kernel drops it when the process dies, so a killed run leaves no stale lock). Two runs in one
    directory would interleave their metrics and delete each other's checkpoints. This process may enter a
    directory it holds again (runs one after another in one Python process); a file system without ``flock``, or a
    lock file this user cannot open, is not locked."""

    def __init__(self, run_dir: Path):
        import fcntl
        import socket
        import time

        self.file = None
        key = (run_dir.stat().st_dev, run_dir.stat().st_ino)
        if key in _HELD:
            return
        try:
            self.file = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held open for the run's life
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip()
            self.release()
            raise UserError(f"train.run_dir '{run_dir}' is in use by another run ({holder or 'a process'}); wait "
                            "for it to end or stop it, or give this run another train.run_dir. (If no such process "
                            f"runs, as after a crashed node on a network file system, delete {run_dir / '.lock'}.)"
                            ) from None
        except OSError:  # no flock on this file system, or a lock file this user cannot open
            self.release()
            return
        _HELD[key] = self
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
