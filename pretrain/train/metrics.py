"""Where numbers go: metrics.jsonl, tensorboard scalars, and one console line per log interval."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank 0 writes; other ranks construct it disabled and every call is a no-op."""

    TB_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True, start_step: int = 0):
        """``start_step``: the step the run continues from; what an earlier attempt logged after it goes (it is
        logged again), in metrics.jsonl and in tensorboard."""
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step(line) <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = open(path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.jsonl.write(json.dumps(_strict(record), allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
                if scalar and (key in self.TB_KEYS or "/" in key or key == "sgt_alpha"):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # not a record of ours: dropped


def _strict(value):
    """Valid JSON for strict readers: a NaN or infinite number becomes null (tensorboard still gets the value)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def console_line(rec: dict, max_steps: int, eta_s: float | None) -> str:
    parts = [f"step {rec['step']:>6}/{max_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"grad {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s", f"MFU {100 * rec['mfu']:.1f}%"]
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)
