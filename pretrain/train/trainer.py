"""The training loop, the same for every engine: data -> engine step -> callbacks, from the saved position to the
end of the schedule, with a sample and a summary at the end.

``Trainer`` sets a run up (process group and mesh, tokenizer and data, the resolved config, the engine for the
layout, resume) and ``fit`` runs it. How a step is executed is the engine's (``engines/``); what happens around
steps (logging, validation, checkpoints, preemption, profiling, the methods' schedules) is the callbacks'
(``callbacks.py``, ``loop_callbacks.py``). ``fit`` itself only counts steps and calls them.
"""

from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import device as devices
from pretrain.config import RunConfig, resolve
from pretrain.config.model import SHAPE_KEYS
from pretrain.data.loader import GlobalBatches, MicroBatch, build_datasets, read_ahead
from pretrain.data.prepare import ensure_data, ensure_tokenizer
from pretrain.errors import RankFailure, UserError
from pretrain.generate import generate
from pretrain.growth.stages import (
    GrowthStages,
    check_stages,
    grow_saved,
    grown_state,
    in_place,
    load_grown,
    move_to_record,
    stage_at,
    stage_bounds,
    stage_config,
)
from pretrain.models.transformer import num_params
from pretrain.parallel import mesh
from pretrain.paths import RunDirLock, require_run_dir, require_writable_dir
from pretrain.torch_compat import check_torch_version
from pretrain.train import checkpoint, faults
from pretrain.train.callbacks import Callback, method_callbacks
from pretrain.train.engines import Engine, build_engine
from pretrain.train.loop_callbacks import Checkpointer, Evaluator, Profiler, ProgressLogger
from pretrain.train.metrics import MetricsLogger, format_duration
from pretrain.train.numerics import NonFiniteGuard
from pretrain.train.optim import lr_at
from pretrain.train.preemption import StopOnSignal
from pretrain.train.preflight import check_memory
from pretrain.train.watchdog import Watchdog, is_collective_timeout


class _Hooks:
    """The loop's hooks inside one engine step."""

    def __init__(self, trainer: Trainer, step: int):
        self.trainer, self.step = trainer, step

    def after_backward(self) -> None:
        self.trainer.callbacks_call("on_after_backward", self.step)

    def before_optimizer_step(self) -> None:
        self.trainer.callbacks_call("on_before_optimizer_step", self.step)


class Trainer:
    """One run. ``callbacks`` are the methods' and any added with ``callbacks.append`` (called in order); the
    loop's own (progress, validation, checkpoints) always come after them, so a checkpoint holds the state every
    callback had at the end of its step."""

    def __init__(self, cfg: RunConfig, log=print):
        check_torch_version()
        check_stages(cfg)  # (a growth stage its operator refuses: before any work, not at its step)
        self.dims, self.device = mesh.setup(cfg.parallel, devices.resolve(cfg.train.device))
        devices.retain_host_memory(self.device)
        self.rank = self.dims.rank
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        if cfg.assembly.modules and not cfg.assembly.phase:
            raise UserError(f"this config assembles its model from {cfg.assembly.modules} modules trained as separate "
                            "runs (assembly.modules): run them with `pretrain assemble run CONFIG` (or one phase at a "
                            "time: `pretrain assemble meta|incubate|join CONFIG`), or set assembly.modules=0 to train "
                            "the model end to end.")
        if self.rank == 0:  # (before it writes anything: the other ranks would see its files)
            require_run_dir(cfg)
        self.run_dir = require_writable_dir(cfg.train.run_dir, "train.run_dir")
        self.run_lock = RunDirLock(self.run_dir) if self.rank == 0 else None  # before anything reads or deletes there
        self.ckpt_root = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.train.seed)

        if self.rank == 0:  # one rank builds the tokenizer and the data; the others then find them
            ensure_data(cfg, ensure_tokenizer(cfg, self.log), self.log)
        mesh.unbounded_barrier()
        self.tokenizer = ensure_tokenizer(cfg, self.log)
        blend = ensure_data(cfg, self.tokenizer, self.log)
        # The run's config (all its growth stages); ``self.cfg`` is the config of the stage the run is in.
        cfg = resolve(cfg, self.tokenizer.vocab_size if self.tokenizer is not None else None)
        precision, note = devices.resolve_precision(cfg.train.precision, self.device)
        if note:
            self.log(note)
        self.run_cfg = cfg = cfg.replace(train={"precision": precision}) if precision != cfg.train.precision else cfg
        self._enter_stage(0)

        d, tr = cfg.data, cfg.train
        if tr.preflight:
            check_memory(cfg, self.device)
        if self.rank == 0:
            checkpoint.prepare_run_dir(self.run_dir, tr.resume)
        if self.dims.is_parallel:
            dist.barrier()
        self.engine, resume_from, state = self._start()
        if self.tokenizer is not None:
            state["tokenizer"] = self.tokenizer.digest  # what the checkpoints record (resuming checks it)
        self.total_steps = cfg.total_steps
        if state["step"] > self.total_steps:
            raise UserError(f"the run resumes at step {state['step']} ({resume_from}), past the end of its schedule "
                            f"(train.max_steps={tr.max_steps}): raise train.max_steps to train on, or resume from an "
                            "earlier checkpoint (train.resume=PATH).")
        self.last_step = min(self.total_steps, tr.stop_at_step) if tr.stop_at_step else self.total_steps
        valid_samples = tr.eval_iters * d.global_batch_size
        self.datasets = build_datasets(cfg, blend, self.tokenizer, self.run_dir / "data_index",
                                       tr.max_steps * d.global_batch_size, valid_samples)

        self.stop_on_signal = StopOnSignal(tr.signal_check_interval)
        guard = [NonFiniteGuard(tr.max_nonfinite_steps, tr.nonfinite_rollback)] if tr.skip_nonfinite else []
        watchdog = [Watchdog(tr.watchdog_factor, tr.watchdog_min_s)] if tr.watchdog_factor else []
        self.method_callbacks: list[Callback] = []
        self.callbacks: list[Callback] = [self.stop_on_signal, *guard, *watchdog]
        self.phase, self.phase_started = "setup", time.perf_counter()
        self.progress, self.evaluator, self.checkpointer = ProgressLogger(), Evaluator(), Checkpointer()
        self.loop_callbacks: list[Callback] = ([Profiler()] if tr.profile else []) + [
            self.progress, self.evaluator, self.checkpointer] + ([GrowthStages()] if cfg.growth else [])
        self.stop_requested = False
        self.state = state
        self.resumed_from = resume_from
        self._stage_parts()
        state.setdefault("flops", state["tokens"] * self.flops_per_token)  # (checkpoints that predate the count)
        self.peak_tflops = cfg.logging.peak_tflops or devices.peak_tflops(self.device, tr.precision)
        # Only now that the run stands (a failed resume changes no file): its config, and its metrics from the step
        # it starts at (records of steps no checkpoint kept, from an attempt that died, are logged again).
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(self.run_cfg.to_yaml())
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                     start_step=self.state["step"])

    def close(self) -> None:
        """Stop the data read-ahead (its thread must not outlive the run)."""
        batches = getattr(self, "train_batches", None)  # (not there before the first stage's data)
        if hasattr(batches, "close"):  # a GlobalBatches read on the spot has no thread
            batches.close()

    def _enter_stage(self, stage: int) -> None:
        """Make ``stage`` the current one: its config (model and layout) and, when the layout changes, its mesh."""
        self.stage = stage
        self.cfg = stage_config(self.run_cfg, stage) if self.run_cfg.growth else self.run_cfg
        if self.cfg.parallel != self.dims.cfg:
            self.dims, self.device = mesh.setup(self.cfg.parallel, self.device)
        self.config_yaml = self.cfg.to_yaml()  # what the stage's checkpoints record (load_model and export read it)

    def _stage_parts(self) -> None:
        """What depends on the stage's model and layout: the data each rank reads, the methods' callbacks, FLOPs."""
        d, vocab = self.cfg.data, self.cfg.model.vocab_size
        train_ds, valid_ds = self.datasets
        self.close()  # (the read-ahead of the stage before)
        dp = (self.dims.dp_rank, self.dims.dp_size)
        self.train_batches = read_ahead(GlobalBatches(train_ds, d.global_batch_size, d.micro_batch_size, *dp, vocab),
                                        d.prefetch, pin=self.device.type == "cuda")
        self.valid_batches = (GlobalBatches(valid_ds, d.global_batch_size, d.micro_batch_size, *dp, vocab)
                              if valid_ds else None)
        old = {id(cb) for cb in self.method_callbacks}
        self.method_callbacks = method_callbacks(self.cfg)
        self.callbacks = [cb for cb in self.callbacks if id(cb) not in old] + self.method_callbacks
        self.flops_per_token = self.engine.flops_per_token

    def _check_tokenizer(self, saved: dict, path: Path) -> None:
        """A run keeps its tokenizer: the checkpoint records the tokenizer's digest, and resuming under another one
        (its ids meaning other pieces) is refused. Checkpoints that predate the record are taken as they are."""
        digest = self.tokenizer.digest if self.tokenizer is not None else None
        if saved.get("tokenizer") and digest and saved["tokenizer"] != digest:
            raise UserError(f"checkpoint '{path}' was trained with another tokenizer (digest {saved['tokenizer']}) "
                            f"than '{self.tokenizer.path}' (digest {digest}): its token ids mean other pieces. Point "
                            "tokenizer.path (or tokenizer.name) at the run's tokenizer, or start a new run in another "
                            "train.run_dir.")

    def _start(self) -> tuple[Engine, Path | None, dict]:
        """The engine, built as of the checkpoint the run resumes from, with that checkpoint loaded. A damaged
        checkpoint (files differing from what was written, or unreadable) is named; ``auto`` then falls back to the
        one before it, a checkpoint given by path stops the run."""
        cfg = self.run_cfg
        candidates = checkpoint.resume_candidates(self.ckpt_root, cfg.train.resume)
        if cfg.train.resume == "auto":
            for path, missing in checkpoint.incomplete_checkpoints(self.ckpt_root):
                self.log(f"checkpoint {path} is incomplete (no {missing}): skipped")
        for path in candidates:
            explicit = cfg.train.resume != "auto"
            problem = None if cfg.checkpoint.verify == "none" else checkpoint.damage(
                path, checksums=cfg.checkpoint.verify == "checksums")
            if problem is None:
                try:
                    saved = checkpoint.read_state(path)
                except UserError as e:
                    if explicit:
                        raise
                    saved, problem = None, str(e)
                else:
                    self._check_tokenizer(saved, path)  # (before the model: another tokenizer's size changes it)
            if problem is None:
                self._enter_stage(saved.get("stage", 0))
                engine = build_engine(self.cfg, self.dims, self.device, saved["step"])
                try:
                    state = checkpoint.load(path, engine.load_state)
                except UserError as e:
                    changed = checkpoint.model_differences(path, self.cfg.to_dict()["model"])
                    shapes = [d for d in changed if d.split(":")[0].removeprefix("model.") in SHAPE_KEYS]
                    if shapes:  # not damage: another model's shapes
                        raise UserError(
                            f"checkpoint '{path}' holds another model than this config builds ({'; '.join(changed)}). "
                            "Set those keys back to resume the run, or start the new model in another "
                            "train.run_dir (growing a trained model is `pretrain grow`).") from None
                    if explicit:
                        raise
                    problem = str(e)
            if problem is None:
                self.log(f"resumed from {path} at step {state['step']}")
                changed = checkpoint.model_differences(path, self.cfg.to_dict()["model"])
                if changed:  # loads (same shapes), but computes otherwise: deliberate (a longer RoPE base) or not
                    self.log(f"warning: the checkpoint was trained under other model settings ({'; '.join(changed)}); "
                             "the run goes on under this config's. Set them back if that was not meant.")
                return engine, path, state
            if explicit:
                raise UserError(f"checkpoint '{path}' is damaged: {problem}. Resume from another one (train.resume=auto "
                                "takes the newest intact one), or start over in a new train.run_dir.")
            older = candidates[candidates.index(path) + 1:]
            self.log(f"checkpoint {path} is damaged: {problem}; "
                     + (f"falling back to {older[0]}" if older else "no older one to fall back to"))
        if candidates:
            raise UserError(f"every checkpoint under '{self.ckpt_root}' is damaged (see above), so there is nothing to "
                            "resume; start over with train.resume=overwrite or in a new train.run_dir.")
        self._enter_stage(0)
        engine = build_engine(self.cfg, self.dims, self.device, 0)
        if cfg.assembly.phase == "join":  # an assembled model starts from its trained modules
            from pretrain.assembly.phases import assemble

            return engine, None, assemble(engine, cfg, self.log)
        return engine, None, {"step": 0, "consumed_samples": 0, "tokens": 0, "flops": 0.0}

    def release_run_dir(self) -> None:
        """Let another process start in this run directory (done when ``fit`` ends; before that, the lock lasts
        as long as this object)."""
        if self.run_lock is not None:
            self.run_lock.release()

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def is_final_step(self) -> bool:
        """Whether the step that just ran is the run's last (the schedule's end, or a stop was requested)."""
        return self.state["step"] == self.last_step or self.stop_requested

    @property
    def stage_ends(self) -> bool:
        """Whether the step that just ran is the last of a growth stage (the model grows after it)."""
        growth = self.run_cfg.growth
        return self.stage < len(growth) and self.state["step"] == growth[self.stage].at_step

    def grow(self) -> None:
        """Into the next growth stage: the checkpoint of this step becomes the grown model's (the small one moves to
        RUN_DIR/growth/stageK/), the model is rebuilt under the stage's layout and loads it, with a fresh optimizer."""
        step, stage = self.state["step"], self.stage + 1
        saved = self.ckpt_root / f"step_{step:07d}"
        if not checkpoint.is_complete(saved):
            raise UserError(f"cannot grow after step {step}: its checkpoint was not written (see above); the run "
                            "stops so as not to grow a model it could not save.")
        self.enter(f"growth into stage {stage} after step {step}")
        if self.dims.is_parallel:  # every rank has looked at the checkpoint before rank 0 moves it
            dist.barrier()
        record = self.run_dir / "growth" / f"stage{stage - 1}" / f"step_{step:07d}"
        grown_yaml = stage_config(self.run_cfg, stage).to_yaml()
        if self.rank == 0:
            move_to_record(saved, record)
            if not in_place(self.run_cfg, stage):
                grow_saved(self.run_cfg, stage, record, self.ckpt_root, grown_yaml, self.cfg.checkpoint.keep)
        if self.dims.is_parallel:
            dist.barrier()
        self.engine = None  # the small model's memory goes before the grown one is built
        gc.collect()
        self._enter_stage(stage)
        self.engine = build_engine(self.cfg, self.dims, self.device, step)
        if in_place(self.run_cfg, stage):  # every rank reads its shards of the small model; the grown one is saved
            load_grown(self.run_cfg, stage, self.engine.model, record)
            state = grown_state(self.run_cfg, stage, record)
            checkpoint.save(self.ckpt_root, step, self.engine.save_state, state, self.config_yaml,
                            self.cfg.checkpoint.keep)
        else:
            state = checkpoint.load(saved, self.engine.load_state)
        state.pop("callbacks", None)
        self.state.clear()
        self.state.update(state)
        self._stage_parts()
        self.engine.model.train()
        self.callbacks_call("on_load_checkpoint", step, saved)
        faults.reached("growth.after", step)
        how = "every rank read its shards of the small model" if in_place(self.run_cfg, stage) else "on one process"
        self.log(f"grew after step {step} by {self.run_cfg.growth[stage - 1].op} ({how}): {num_params(self.cfg.model) / 1e6:.2f}M "
                 f"parameters, {self.cfg.model.num_layers} blocks, layout {self._layout()}")

    def _layout(self) -> str:
        p = self.cfg.parallel
        return " x ".join(f"{k} {v}" for k, v in (("pp", p.pp), ("dp_replicate", p.dp_replicate),
                                                    ("dp_shard", p.dp_shard), ("tp", p.tp), ("ep", p.ep)) if v > 1) or "1"

    def enter(self, phase: str) -> None:
        """Say what the loop does now (the watchdog and a collective timeout name it)."""
        self.phase, self.phase_started = phase, time.perf_counter()

    def request_stop(self) -> None:
        """End the run after the current step (its checkpoint is written)."""
        self.stop_requested = True

    def callbacks_call(self, hook: str, *args) -> None:
        for callback in (*self.callbacks, *self.loop_callbacks):
            getattr(callback, hook)(self, *args)

    # ---- steps, evaluation, checkpoints ---------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's micro-batches of a global batch, the callbacks' step hooks included.
        Returns (mean token loss, gradient norm) as device tensors."""
        step = self.state["step"]
        measure = step % self.cfg.train.log_interval == 0
        return self.engine.train_step(micro_batches, _Hooks(self, step), measure)

    def evaluate(self) -> float | None:
        if self.valid_batches is None:
            return None
        gbs = self.cfg.data.global_batch_size
        return self.engine.evaluate(self.valid_batches(i * gbs) for i in range(self.cfg.train.eval_iters))

    def save_checkpoint(self) -> Path | None:
        """A checkpoint of this step, or None when the weights are not finite (a checkpoint is never written from
        them, so the older ones, which retention would thin out, stay the newest)."""
        if not self.engine.weights_finite():
            self.log(f"step {self.state['step']}: the weights are not finite; no checkpoint written")
            return None
        states = {cb.state_key: cb.state_dict() for cb in (*self.callbacks, *self.loop_callbacks) if cb.state_key}
        state = {**self.state, "callbacks": states} if states else dict(self.state)
        return checkpoint.save(self.ckpt_root, self.state["step"], self.engine.save_state, state, self.config_yaml,
                               self.cfg.checkpoint.keep)

    def newest_checkpoint(self) -> Path | None:
        return checkpoint.find_resume(self.ckpt_root, "auto")

    def rollback(self) -> Path | None:
        """Reload the newest checkpoint of this run (weights, optimizer, RNG, step) but keep reading the data where
        it is now, so the batches since that checkpoint are skipped. None when there is none to go back to."""
        path = self.newest_checkpoint()
        if path is None:
            return None
        position = self.state["consumed_samples"]
        try:
            state = checkpoint.load(path, self.engine.load_state)
        except UserError as e:
            self.log(f"rollback to {path} failed: {e}")
            return None
        state.pop("callbacks", None)  # the callbacks keep their own record, rollbacks included
        self.state.clear()
        self.state.update(state, consumed_samples=position)
        self.state.setdefault("flops", self.state["tokens"] * self.flops_per_token)
        return path

    def _restore_callbacks(self) -> None:
        states = self.state.pop("callbacks", {})
        for callback in (*self.callbacks, *self.loop_callbacks):
            if callback.state_key in states:
                callback.load_state_dict(states[callback.state_key])
        self.callbacks_call("on_load_checkpoint", self.state["step"], self.resumed_from)

    # ---- the run --------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, st = self.cfg, self.state
        if cfg.assembly.phase == "incubate":
            trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            self.log(f"incubating module {cfg.assembly.module} of {cfg.assembly.modules} inside the frozen meta model: "
                     f"{trained / 1e6:.2f}M parameters trained (this rank's share), the rest frozen")
        self.log(f"model: {num_params(cfg.model) / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token "
                 f"| {cfg.data.tokens_per_step:,} tokens/step | device {self.device} {cfg.train.precision} "
                 f"| peak {self.peak_tflops:.3g} TFLOP/s | steps {st['step']}->{self.last_step} of {self.total_steps}")
        start, end = stage_bounds(self.run_cfg, self.stage)
        if st["step"] == start and cfg.optim.warmup_steps >= end - start:  # (said once, as the schedule starts)
            self.log(f"warning: optim.warmup_steps={cfg.optim.warmup_steps} spans all {end - start} steps of the "
                     f"schedule, so the learning rate never reaches optim.lr={cfg.optim.lr:g} (it peaks at "
                     f"{lr_at(end - start, cfg.optim, end - start):.3g}); lower optim.warmup_steps (a few percent of "
                     "the steps is usual).")
        ck = cfg.checkpoint
        if not ck.save_final and (not ck.interval or (st["step"] // ck.interval + 1) * ck.interval > self.last_step):
            self.log("warning: checkpoint.save_final=false and no checkpoint.interval step before the run ends: this "
                     "run writes no checkpoint (only a signal's stop is saved); set checkpoint.save_final=true to keep "
                     "its weights.")
        if self.resumed_from is not None:
            self._restore_callbacks()
        while self.stage < stage_at(self.run_cfg, st["step"]):  # resumed from a small model whose growth is due
            self.grow()
        self.model.train()
        self.callbacks_call("on_run_start")
        try:
            while st["step"] < self.last_step and not self.stop_requested:
                st["step"] += 1
                self.enter(f"step {st['step']}")
                start, end = stage_bounds(self.run_cfg, self.stage)  # each growth stage warms up and decays anew
                self.engine.set_lr(lr_at(st["step"] - start, self.cfg.optim, end - start))
                self.callbacks_call("on_step_start", st["step"])
                loss, grad_norm = self.train_step(self.train_batches(st["consumed_samples"]))
                st["consumed_samples"] += cfg.data.global_batch_size
                st["tokens"] += cfg.data.tokens_per_step
                st["flops"] += self.flops_per_token * cfg.data.tokens_per_step  # this model's, after earlier stages
                self.callbacks_call("on_step_end", st["step"], loss, grad_norm)
        except BaseException as error:
            self.callbacks_call("on_error", error)
            self.metrics.close()
            self.release_run_dir()
            if is_collective_timeout(error):
                newest = self.newest_checkpoint()
                raise RankFailure(
                    f"rank {self.rank}: a collective did not complete within parallel.collective_timeout_s="
                    f"{cfg.parallel.collective_timeout_s} s during {self.phase}: another rank stopped or died (its "
                    f"log says why). {f'The newest checkpoint, {newest}, resumes the run' if newest else 'No checkpoint yet'}"
                    " (train.resume=auto).") from error
            raise
        self.callbacks_call("on_run_end")
        self.metrics.close()
        self.release_run_dir()  # (the run is over: the directory is free for the next one)
        return {"step": st["step"], "val_loss": self.evaluator.last, "checkpoint": self.checkpointer.last,
                "preempted": self.stop_on_signal.stopped}

    def sample(self, prompt: str, max_new_tokens: int) -> str | None:
        """A continuation of ``prompt``, drawn alike on every rank (all of them take part)."""
        if self.tokenizer is None or not prompt:
            return None
        self.model.eval()
        bos = [self.tokenizer.bos] if self.tokenizer.bos >= 0 else []  # (an imported tokenizer may have none)
        ids = bos + self.tokenizer.encode(prompt)
        new = generate(self.engine.next_token_logits, ids, max_new_tokens, max_seq_len=self.cfg.data.seq_len,
                       device=self.device, eos_id=self.tokenizer.eos, seed=self.cfg.train.seed,
                       vocab_size=self.tokenizer.vocab_size)
        return prompt + self.tokenizer.decode(new)


def compute_by_stage(state: dict, cfg: RunConfig) -> list[str]:
    """What each stage of a grown run spent (the stages before each growth, then this one); nothing otherwise."""
    stages = state.get("growth", [])
    if not stages:
        return []
    lines, tokens, flops = ["  compute by stage:"], 0, 0.0
    for k, record in enumerate(stages):
        lines.append(f"    stage {k}: {record['params_before'] / 1e6:.2f}M parameters, {record['tokens'] - tokens:,} "
                     f"tokens, {record['flops_before'] - flops:.3g} FLOPs, then grown by {record['op']}")
        tokens, flops = record["tokens"], record["flops_before"]
    lines.append(f"    stage {len(stages)}: {num_params(cfg.model) / 1e6:.2f}M parameters, {state['tokens'] - tokens:,} "
                 f"tokens, {state['flops'] - flops:.3g} FLOPs (total {state['flops']:.3g} FLOPs)")
    return lines


def run_training(cfg: RunConfig, log=print) -> dict:
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log)
    cfg, log = trainer.cfg, trainer.log  # the resolved config; rank 0 logs
    try:
        result = trainer.fit()
    except BaseException as error:
        # As on the way out below: the read-ahead thread stopped and the model freed while the interpreter is whole
        # (the frames of the failed step hold the trainer until their locals are cleared; the traceback stays).
        traceback.clear_frames(error.__traceback__)
        trainer.close()
        del trainer, log
        gc.collect()
        raise
    if not result["preempted"]:  # out of time: no sample, no export, just the checkpoint
        text = trainer.sample(cfg.train.sample_prompt, cfg.train.sample_tokens)
        if text is not None:
            log(f"\nsample: {text!r}\n")
        run_dir = trainer.run_dir
        if cfg.checkpoint.export_hf and trainer.rank == 0:
            from pretrain.convert.hf import export_checkpoint

            log(f"exported to Hugging Face format -> {export_checkpoint(result['checkpoint'], run_dir / 'hf')}")
        log(f"done in {format_duration(time.perf_counter() - t0)}: step {result['step']}"
            + (f", val_loss {result['val_loss']:.4f}" if result["val_loss"] is not None else ""))
        from pretrain.assembly.phases import compute_by_phase

        for line in compute_by_stage(trainer.state, trainer.cfg) + compute_by_phase(trainer.state):
            log(line)
        log(f"  checkpoints: {trainer.ckpt_root}/")
        log(f"  metrics:     {run_dir / 'metrics.jsonl'}")
        if cfg.logging.tensorboard:
            log(f"  tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    # Free the model, its parallel state and any collective's work objects while the interpreter is whole,
    # then the process groups: gloo work objects freed during interpreter shutdown can abort the process.
    # A thread that ends while the interpreter finalizes can abort the process ("terminate called without an active
    # exception"): the read-ahead thread is stopped now.
    trainer.close()
    del trainer, log  # (log is a bound method of the trainer)
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result
