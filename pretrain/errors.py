"""Errors a user can cause. The CLI prints their message (cause and fix) without a traceback."""


class RankFailure(RuntimeError):
    """Another rank stopped answering (a collective timed out): neither a bug here nor a user mistake; the CLI
    prints the message, which names the rank, step and phase, without a traceback (exit code 1)."""


class UserError(RuntimeError):
    """A missing file, bad data, a wrong world size or a corrupt checkpoint: the message says what to do."""
