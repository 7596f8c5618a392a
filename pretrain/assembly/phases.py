"""The phases of an assembled run (Deep Model Assembling, docs/methods.md). Each is an ordinary run (logs,
tensorboard, checkpoints, resume, preemption) in a directory of its own under the config's ``train.run_dir``,
the *root*:

  ROOT/meta/      the meta model: the target's width, one block per module, trained end to end
  ROOT/module_k/  module k's incubation inside the frozen meta model; its checkpoints keep module k's tensors
                  only, under the target model's names
  ROOT/join/      the target assembled from the K modules (each loads its own tensors, sharded as the join's
                  layout wants them), then fine-tuned end to end

``phase_config`` derives a phase's config from the one the user wrote; ``run_all`` runs the phases on this machine
(``pretrain assemble run``), ``slurm/assemble.sh`` submits them as SLURM jobs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pretrain.config import ConfigError, ModelConfig, RunConfig, load_config
from pretrain.errors import RankFailure, UserError
from pretrain.train import checkpoint

PHASES = ("meta", "incubate", "join")


def root_of(cfg: RunConfig) -> Path:
    """The assembled run's directory: the user's ``train.run_dir``, the parent of a phase's own."""
    run_dir = Path(cfg.train.run_dir)
    return run_dir.parent if cfg.assembly.phase else run_dir


def phase_dir(root: Path, phase: str, module: int = 0) -> Path:
    return root / (f"module_{module}" if phase == "incubate" else phase)


def phase_config(cfg: RunConfig, phase: str, module: int = 0) -> RunConfig:
    """The config of one phase of the assembled run ``cfg`` (the config the user wrote)."""
    a = cfg.assembly
    if not a.modules:
        raise ConfigError("assembly.modules", "is 0: this config does not assemble its model. Give the module count "
                          "(an `assembly:` section with `modules: K`), or train it with `pretrain train`.")
    if a.phase:
        raise ConfigError("assembly.phase", f"is '{a.phase}': this is the config of one phase ({cfg.train.run_dir}); "
                          "give `pretrain assemble` the config you wrote.")
    root = Path(cfg.train.run_dir)
    if phase == "meta":
        return cfg.replace(model={"num_layers": a.modules}, parallel={"pp_layout": []},
                           train={"run_dir": str(root / "meta"), "max_steps": a.meta_steps or cfg.train.max_steps},
                           assembly={"modules": 0, "module_blocks": []})
    if phase == "incubate":
        if not 1 <= module <= a.modules:
            raise UserError(f"--module {module}: give the module to incubate, 1 to {a.modules} (assembly.modules)."
                            if module else "pretrain assemble incubate needs --module k (1 to "
                            f"{a.modules}); in a SLURM job array it is the array index.")
        return cfg.replace(train={"run_dir": str(phase_dir(root, phase, module)),
                                  "max_steps": a.incubation_steps or cfg.train.max_steps},
                           assembly={"phase": "incubate", "module": module})
    if phase == "join":
        return cfg.replace(train={"run_dir": str(root / "join")}, assembly={"phase": "join"})
    raise ValueError(phase)


def differences(there: ModelConfig, here: ModelConfig, limit: int = 3) -> str:
    """The model keys two configs disagree on, e.g. "model.hidden_size 64 there, 128 here"."""
    a, b = dataclasses.asdict(there), dataclasses.asdict(here)
    keys = [k for k in b if a.get(k) != b[k]]
    return ", ".join(f"model.{k} {a.get(k)!r} there, {b[k]!r} here" for k in keys[:limit]) + (
        ", ..." if len(keys) > limit else "")


def finished(run_dir: Path) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint of a phase's run and its trainer state (None, None when it has none)."""
    path = checkpoint.find_resume(run_dir / "checkpoints", "auto")
    return (path, checkpoint.read_state(path)) if path is not None else (None, None)


def _saved_config(path: Path, what: str) -> RunConfig:
    try:
        return load_config(path / "config.yaml")
    except (UserError, OSError) as e:
        raise UserError(f"{what}: the config saved with checkpoint '{path}' cannot be read ({e}).") from None


def meta_checkpoint(cfg: RunConfig) -> Path:
    """The trained meta model an incubation (config ``cfg``, resolved) starts from; a missing, unfinished or
    mismatched one is named with what to run."""
    root, k = root_of(cfg), cfg.assembly.module
    path, state = finished(root / "meta")
    if path is None:
        raise UserError(f"module {k}'s incubation starts from the trained meta model, but '{root / 'meta'}' holds no "
                        "checkpoint: run `pretrain assemble meta CONFIG` first (`pretrain assemble run CONFIG` runs "
                        "every phase).")
    saved = _saved_config(path, "the meta model")
    if state["step"] < saved.train.max_steps:
        raise UserError(f"the meta model '{path}' stopped at step {state['step']} of {saved.train.max_steps}: finish "
                        "it first (`pretrain assemble meta CONFIG` resumes it).")
    expected = dataclasses.replace(cfg.model, num_layers=cfg.assembly.modules)
    if saved.model != expected:
        raise UserError(f"the meta model '{path}' is not this config's ({differences(saved.model, expected)}); train "
                        f"the meta model of this config (`pretrain assemble meta CONFIG`) or point train.run_dir at "
                        "the run it belongs to.")
    return path


def module_checkpoints(cfg: RunConfig) -> list[tuple[Path, dict]]:
    """Each module's trained checkpoint and trainer state, for the join (config ``cfg``, resolved), checked: there,
    finished, and incubated for this config."""
    a, root = cfg.assembly, root_of(cfg)
    found = []
    for k in range(1, a.modules + 1):
        directory = phase_dir(root, "incubate", k)
        path, state = finished(directory)
        redo = f"`pretrain assemble incubate CONFIG --module {k}`"
        if path is None:
            raise UserError(f"module {k} is missing: '{directory / 'checkpoints'}' holds no checkpoint. Incubate it "
                            f"first: {redo}.")
        saved = _saved_config(path, f"module {k}")
        problems = []
        if saved.assembly.phase != "incubate" or saved.assembly.module != k:
            problems.append(f"it is not module {k}'s incubation")
        if saved.model != cfg.model:
            problems.append(differences(saved.model, cfg.model))
        split = ("modules", "module_blocks", "embedding_module", "head_module")
        problems += [f"assembly.{key} {getattr(saved.assembly, key)!r} there, {getattr(a, key)!r} here"
                     for key in split if getattr(saved.assembly, key) != getattr(a, key)]
        if problems:
            raise UserError(f"module {k}'s checkpoint '{path}' was trained for another config ({'; '.join(problems)}). "
                            f"Incubate module {k} again with this config ({redo} in a new train.run_dir, or with "
                            "train.resume=overwrite).")
        if state["step"] < saved.train.max_steps:
            raise UserError(f"module {k}'s incubation stopped at step {state['step']} of {saved.train.max_steps} "
                            f"('{path}'): finish it first ({redo} resumes it).")
        found.append((path, state))
    return found


def assemble(engine, cfg: RunConfig, log=print) -> dict:
    """Load the K trained modules into the join's freshly built target model (``engine``, under any layout: each
    rank reads the shards it holds) and return the join's starting trainer state: the tokens and FLOPs the meta
    model and the incubations spent, and each phase's share of them."""
    from pretrain.assembly.hybrid import owner

    a, root = cfg.assembly, root_of(cfg)
    modules = module_checkpoints(cfg)
    meta_path, meta_state = finished(root / "meta")
    for k, (path, _) in enumerate(modules, start=1):
        checkpoint.load_dcp(path, engine.model, None, names=lambda name, k=k: name if owner(cfg, name) == k else None)
    records = [{"phase": "meta", "tokens": meta_state["tokens"] if meta_state else 0,
                "flops": meta_state.get("flops", 0.0) if meta_state else 0.0}]
    records += [{"phase": f"module {k}", "tokens": state["tokens"], "flops": state.get("flops", 0.0)}
                for k, (_, state) in enumerate(modules, start=1)]
    log(f"assembled {a.modules} modules ({', '.join(str(p) for p, _ in modules)}) into the "
        f"{cfg.model.num_layers}-block target")
    return {"step": 0, "consumed_samples": 0, "tokens": sum(r["tokens"] for r in records),
            "flops": sum(r["flops"] for r in records), "assembly": records}


def compute_by_phase(state: dict) -> list[str]:
    """What each phase of an assembled run spent (the join's summary); nothing for other runs."""
    records = state.get("assembly", [])
    if not records:
        return []
    lines = ["  compute by phase:"]
    lines += [f"    {r['phase']:<10} {r['tokens']:>14,} tokens {r['flops']:10.3g} FLOPs" for r in records]
    tokens, flops = state["tokens"] - sum(r["tokens"] for r in records), state["flops"] - sum(r["flops"] for r in records)
    lines.append(f"    {'join':<10} {tokens:>14,} tokens {flops:10.3g} FLOPs (total {state['flops']:.3g} FLOPs, "
                 f"{state['tokens']:,} tokens)")
    return lines


# ---- `pretrain assemble run`: every phase on this machine ---------------------------------------------------------
def run_all(cfg: RunConfig, config: str, overrides: list[str], parallel: int = 1, log=print) -> dict:
    """Meta, then the K incubations as separate processes (``parallel`` at once), then the join; phases already
    finished are skipped, an interrupted one resumes. Each phase runs under the config's layout (torchrun when it
    needs several processes). Wall times go to ROOT/assembly.json."""
    a, root = cfg.assembly, Path(cfg.train.run_dir)
    if parallel < 1:
        raise UserError(f"--parallel {parallel}: give how many incubations may run at once (1 or more).")
    world = cfg.parallel.world_size
    launcher = [sys.executable, "-m", "pretrain"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m", "pretrain"]
    times: dict = {"per_phase_s": {}}  # each phase's own wall time, and each group's

    def command(phase: str, k: int = 0) -> list[str]:
        return [*launcher, "assemble", phase, config, *overrides, *(["--module", str(k)] if k else [])]

    def done(phase: str, k: int = 0) -> bool:
        path, state = finished(phase_dir(root, phase, k))
        return path is not None and state["step"] >= phase_config(cfg, phase, k).train.max_steps

    started = time.perf_counter()
    if done("meta"):
        log(f"meta model: finished ({root / 'meta'})")
    else:
        times["meta_s"] = _run_phases([("meta", command("meta"))], 1, log, times["per_phase_s"])
    todo = [k for k in range(1, a.modules + 1) if not done("incubate", k)]
    for k in sorted(set(range(1, a.modules + 1)) - set(todo)):
        log(f"module {k}: finished ({phase_dir(root, 'incubate', k)})")
    if todo:
        times["incubations_s"] = _run_phases([(f"module {k}", command("incubate", k)) for k in todo], parallel, log,
                                             times["per_phase_s"])
        times["incubations_at_once"] = min(parallel, len(todo))
    times["join_s"] = _run_phases([("join", command("join"))], 1, log, times["per_phase_s"])
    times["total_s"] = time.perf_counter() - started
    (root / "assembly.json").write_text(json.dumps(times, indent=1) + "\n")
    log("assembled run: " + ", ".join(f"{key[:-2]} {value:.0f} s" for key, value in times.items()
                                  if key.endswith("_s") and key != "per_phase_s")
        + f" -> {root / 'join'}")
    return times


def _run_phases(jobs: list[tuple[str, list[str]]], at_once: int, log, durations: dict) -> float:
    """Run the phase commands, ``at_once`` at a time, their output prefixed by their names; the wall time (each
    job's own into ``durations``). A failed one lets the others finish (they share nothing), then stops the run
    with its exit status."""
    started, pending, running, failed = time.perf_counter(), list(jobs), [], []

    def forward(name: str, stream) -> None:
        for line in stream:
            log(f"[{name}] {line.rstrip()}")

    def stop_children(signum, _frame) -> None:  # the trainers checkpoint and stop on SIGTERM
        for _, proc, _ in running:
            proc.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_children)
    try:
        while pending or running:
            while pending and len(running) < at_once:
                name, cmd = pending.pop(0)
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                reader = threading.Thread(target=forward, args=(name, proc.stdout), daemon=True)
                reader.start()
                running.append((name, proc, reader))
                durations[name] = time.perf_counter()
            time.sleep(0.2)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                item[2].join()
                durations[item[0]] = time.perf_counter() - durations[item[0]]
                if item[1].returncode:
                    failed.append((item[0], item[1].returncode))
    except KeyboardInterrupt:
        for _, proc, _ in running:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        name, code = failed[0]
        what = f"{name} failed (exit {code}; its output is above, each line prefixed [{name}])"
        rest = f"; also {', '.join(n for n, _ in failed[1:])}" if failed[1:] else ""
        again = ". Finished phases are kept: fix the cause and run `pretrain assemble run CONFIG` again."
        if code == 2:
            raise UserError(what + rest + again)
        raise RankFailure(what + rest + again)
    return time.perf_counter() - started
