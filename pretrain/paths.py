"""Paths a user gives: checked before anything is written or computed, with the key to change in the message."""

from __future__ import annotations

import os
import tempfile
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
