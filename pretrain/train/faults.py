"""Fault injection for the reliability tests (and for anyone who wants to see a run survive a crash):
``PRETRAIN_FAULT=POINT[@STEP][:RANK]`` makes the process kill itself with SIGKILL, as a crashed node would, when it
reaches POINT (at step STEP, on rank RANK; any step or rank when left out). Points:

  step.after_backward   inside a step, gradients computed, weights not yet updated
  save.begin            a checkpoint's directory created, nothing written
  save.after_shards     model and optimizer shards written, no RNG or trainer state yet
  save.before_rename    everything written and checked, the directory not yet renamed to complete
  save.after_rename     the checkpoint complete, older ones not yet thinned out
  growth.after          a growth stage done: the grown model's checkpoint written and loaded, no step taken
"""

from __future__ import annotations

import os
import signal

POINTS = ("step.after_backward", "save.begin", "save.after_shards", "save.before_rename", "save.after_rename",
          "growth.after")


def reached(point: str, step: int) -> None:
    spec = os.environ.get("PRETRAIN_FAULT")
    if not spec:
        return
    where, _, rank = spec.partition(":")
    name, _, at = where.partition("@")
    if name not in POINTS:
        raise ValueError(f"PRETRAIN_FAULT={spec}: unknown point {name!r}; the points are {', '.join(POINTS)}")
    if name == point and (not at or int(at) == step) and (not rank or int(rank) == int(os.environ.get("RANK", 0))):
        os.kill(os.getpid(), signal.SIGKILL)
