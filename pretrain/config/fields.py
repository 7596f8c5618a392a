"""The building blocks of every config section: a field with its default and one-line doc, a nested section,
and the error a user mistake raises (the CLI prints it with exit code 2 and no traceback)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from pretrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in the run config: the message names the key and the fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


def option(default: Any, doc: str) -> Any:
    """A config field: its default and its one-line documentation (``pretrain config`` prints both)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def section(cls: type, doc: str) -> Any:
    """A nested config section, built fresh for every instance."""
    return field(default_factory=cls, metadata={"doc": doc})


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def require_all(rows: list[tuple[str, float]], low: float, what: str) -> None:
    """Each (key, value) must be at least ``low``; ``what`` words it ("at least 1", "0 or more")."""
    for key, value in rows:
        require(value >= low, key, f"must be {what}, got {value}.")
