"""The training loop: data -> forward -> token-weighted loss -> backward (accumulated) -> clip -> step,
with periodic logging, validation and checkpoints, and a sample and a summary at the end."""

from __future__ import annotations

import contextlib
import gc
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from pretrain import device as devices
from pretrain.config import RunConfig
from pretrain.data.loader import GlobalBatches, MicroBatch, build_datasets, read_ahead
from pretrain.data.prepare import ensure_data, ensure_tokenizer
from pretrain.errors import UserError
from pretrain.generate import generate, last_logits
from pretrain.models.moe import moe_aux_loss, release_aux_losses
from pretrain.models.transformer import build_model, flops_per_token, num_params
from pretrain.parallel import mesh
from pretrain.parallel.grads import clip_grad_norm_
from pretrain.parallel.pipeline import Pipeline
from pretrain.parallel.plan import all_reduce_sum, finish_gradients, parallelize
from pretrain.parallel.schedules import SPLIT_BACKWARD
from pretrain.train import checkpoint, preemption
from pretrain.train.callbacks import build_callbacks, guided_steps
from pretrain.train.metrics import MetricsLogger, console_line, format_duration
from pretrain.train.optim import build_optimizer, lr_at, set_lr
from pretrain.train.preemption import StopSignal
from pretrain.train.speed import StepProfiler, apply_activation_checkpointing, apply_compile, compile_loss


def lm_loss_sum(logits: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Sum of the masked next-token cross-entropy; labels are already shifted, so logits are not sliced.
    Vocab-sharded logits (a DTensor, under ``loss_parallel``) are never gathered."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none")
    if isinstance(losses, DTensor):
        losses = losses.to_local()  # one loss per token, replicated over the tensor-parallel ranks
    return (losses * batch.loss_mask.flatten()).sum()


def resolve_vocab(cfg: RunConfig, tokenizer) -> None:
    """Fill in model.vocab_size from the tokenizer (rounded up), or check a given one covers it."""
    m = cfg.model
    if tokenizer is None:
        if m.vocab_size == 0:
            raise UserError("data.blend trains on already-tokenized data and tokenizer.path does not exist, so the "
                            "vocabulary size is unknown: set model.vocab_size (at least the largest token id + 1) "
                            "or point tokenizer.path at the tokenizer the data was made with.")
        return
    if m.vocab_size == 0:
        m.vocab_size = -(-tokenizer.vocab_size // m.pad_vocab_multiple) * m.pad_vocab_multiple
    elif m.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size {m.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                        "pieces; set it to 0 (automatic) or at least the tokenizer's size.")


class Trainer:
    def __init__(self, cfg: RunConfig, log=print):
        self.cfg = cfg
        self.dims, self.device = mesh.setup(cfg.parallel, devices.resolve(cfg.train.device))
        devices.retain_host_memory(self.device)
        self.rank = self.dims.rank
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.train.seed)

        if self.rank == 0:  # one rank builds the tokenizer and the data; the others then find them
            ensure_data(cfg, ensure_tokenizer(cfg, self.log), self.log)
        if self.dims.is_parallel:
            dist.barrier()
        self.tokenizer = ensure_tokenizer(cfg, self.log)
        blend = ensure_data(cfg, self.tokenizer, self.log)
        resolve_vocab(cfg, self.tokenizer)
        if cfg.model.vocab_size % cfg.parallel.tp:
            raise UserError(f"model.vocab_size {cfg.model.vocab_size} is not divisible by parallel.tp "
                            f"{cfg.parallel.tp}; set model.pad_vocab_multiple to a multiple of tp.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_yaml = cfg.to_yaml()
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            preemption.clear(self.run_dir)

        d, tr = cfg.data, cfg.train
        self.model = build_model(cfg.model, cfg.train.seed, self.device)
        resume_from = checkpoint.find_resume(self.ckpt_root, tr.resume)
        start_step = checkpoint.read_state(resume_from)["step"] if resume_from else 0
        # Same-FLOPs self-guided training runs guided_steps more steps that replay the first ones' data.
        same_flops = cfg.model.ffn.self_guided.enabled and cfg.model.ffn.self_guided.mode == "same_flops"
        self.replay_after = guided_steps(cfg) if same_flops else 0
        self.total_steps = tr.max_steps + self.replay_after
        # pp > 1: self.model keeps only this rank's pipeline stages (global names) and the pipeline runs the step.
        self.pipeline = Pipeline(self.model, self.dims, cfg, self.device) if cfg.parallel.pp > 1 else None
        self.callbacks = build_callbacks(cfg, self.model, start_step) + (self.pipeline.callbacks if self.pipeline else [])
        split_backward = self.pipeline is not None and cfg.parallel.pp_schedule in SPLIT_BACKWARD
        apply_activation_checkpointing(self.model, tr.activation_checkpointing, split_backward)  # before FSDP
        parallelize(self.model, self.dims, cfg, self.pipeline.modules if self.pipeline else None)
        apply_compile(self.model, tr.compile, tr.precision)
        self.loss_sum = compile_loss(lm_loss_sum, tr.compile)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        valid_samples = tr.eval_iters * d.global_batch_size
        train_ds, valid_ds = build_datasets(cfg, blend, self.tokenizer, self.run_dir / "data_index",
                                            tr.max_steps * d.global_batch_size, valid_samples)
        dp = (self.dims.dp_rank, self.dims.dp_size)
        self.train_batches = read_ahead(GlobalBatches(train_ds, d.global_batch_size, d.micro_batch_size, *dp),
                                        d.prefetch, pin=self.device.type == "cuda")
        self.valid_batches = GlobalBatches(valid_ds, d.global_batch_size, d.micro_batch_size, *dp) if valid_ds else None
        # MoE aux losses are one mean over the units their balance covers: every micro-batch of the global
        # batch, or (balance_scope global) each group of micro-batches the data-parallel ranks run together.
        self.aux_units = d.global_batch_size // d.micro_batch_size
        if cfg.model.moe.balance_scope == "global":
            self.aux_units //= self.dims.dp_size
        self.loss_parallel = cfg.parallel.tp > 1 and cfg.parallel.loss_parallel

        self.state = {"step": 0, "consumed_samples": 0, "tokens": 0}
        if resume_from is not None:
            self.state = checkpoint.load(resume_from, self.model, self.optimizer)
            self.log(f"resumed from {resume_from} at step {self.state['step']}")
        self.has_moe = cfg.model.moe.num_experts > 0
        self.flops_per_token = flops_per_token(cfg.model, d.seq_len)
        self.peak_tflops = cfg.logging.peak_tflops or devices.peak_tflops(self.device, tr.precision)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard,
                                     purge_step=self.state["step"] + 1 if self.state["step"] else None)

    # ---- one optimizer step -------------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward every micro-batch, clip, step. Returns (mean token loss, grad norm) as tensors:
        reading them is left to the log interval, so the step has no host-device sync."""
        if self.pipeline is not None:
            return self.pipeline.train_step(self, micro_batches)
        n_tokens = self.global_tokens(micro_batches)
        # FSDP averages gradients over data-parallel ranks; each rank's loss is already a share of the
        # global token mean, so scale by the dp size to turn that average into the sum.
        grad_scale = float(self.dims.dp_size)
        loss_total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            mb = mb.to(self.device)
            with self.loss_context():
                with devices.autocast(self.device, self.cfg.train.precision):
                    logits = self.model(mb.tokens)
                loss = self.loss_sum(logits, mb) / n_tokens
                aux = moe_aux_loss(self.model) / self.aux_units if self.has_moe else None
                ((loss if aux is None else loss + aux) * grad_scale).backward()
            loss_total += loss.detach()
        release_aux_losses(self.model)
        finish_gradients(self.model, self.dims, self.cfg)
        for callback in self.callbacks:
            callback.on_after_backward(self, self.state["step"])
        max_norm = self.cfg.optim.grad_clip or math.inf
        grad_norm = clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, grad_norm

    def global_tokens(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        """Loss-bearing tokens of the whole global batch (all data-parallel ranks), counted on the host from
        the host-side masks and left on the device: reading the reduced count back would be a host sync."""
        n = torch.tensor(sum(float(mb.loss_mask.sum()) for mb in micro_batches), dtype=torch.float64)
        return all_reduce_sum(n.to(self.device), self.dims).float()

    def loss_context(self):
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_batches is None:
            return None
        if self.pipeline is not None:
            return self.pipeline.evaluate(self)
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, tokens
        for i in range(self.cfg.train.eval_iters):
            for mb in self.valid_batches(i * self.cfg.data.global_batch_size):
                totals[1] += float(mb.loss_mask.sum())
                mb = mb.to(self.device)
                with self.loss_context(), devices.autocast(self.device, self.cfg.train.precision):
                    totals[0] += self.loss_sum(self.model(mb.tokens), mb).double()
        self.model.train()
        all_reduce_sum(totals, self.dims)
        return float(totals[0]) / max(float(totals[1]), 1.0)

    def save(self) -> Path:
        return checkpoint.save(self.ckpt_root, self.state["step"], self.model, self.optimizer, self.state,
                               self.config_yaml, self.cfg.checkpoint.keep)

    # ---- the run ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, tr, st = self.cfg, self.cfg.train, self.state
        last_step = min(self.total_steps, tr.stop_at_step) if tr.stop_at_step else self.total_steps
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        self.log(f"model: {num_params(cfg.model) / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token "
                 f"| {tokens_per_step:,} tokens/step | device {self.device} {tr.precision} "
                 f"| peak {self.peak_tflops:.3g} TFLOP/s | steps {st['step']}->{last_step} of {self.total_steps}")
        self.model.train()
        loss_acc = torch.zeros((), device=self.device)
        interval_steps, t_interval = 0, time.perf_counter()
        last_val = None
        saved_at = None
        profiler = StepProfiler(tr, self.run_dir, self.rank, self.device)
        profiler.start()
        stop_signal = StopSignal()
        stop = False
        while st["step"] < last_step and not stop:
            st["step"] += 1
            set_lr(self.optimizer, lr_at(st["step"], cfg.optim, self.total_steps))
            for callback in self.callbacks:
                callback.on_step_start(self, st["step"])
            loss, grad_norm = self.train_step(self.train_batches(st["consumed_samples"]))
            st["consumed_samples"] += cfg.data.global_batch_size
            if st["step"] == self.replay_after:
                st["consumed_samples"] = 0  # same-FLOPs mode: the rest of the run starts the data over
            st["tokens"] += tokens_per_step
            loss_acc += loss
            interval_steps += 1
            profiler.step()
            stop = stop_signal.should_stop(self.device)  # SIGTERM / SIGUSR1: checkpoint after this step
            end = st["step"] == last_step or stop
            if st["step"] % tr.log_interval == 0 or end:
                devices.synchronize(self.device)
                elapsed = time.perf_counter() - t_interval
                tps = interval_steps * tokens_per_step / elapsed
                all_reduce_sum(loss_acc, self.dims)
                rec = {"step": st["step"], "loss": float(loss_acc) / interval_steps,
                       "lr": self.optimizer.param_groups[0]["lr"], "tokens": st["tokens"], "tokens_per_s": tps,
                       "grad_norm": float(grad_norm), "mfu": tps * self.flops_per_token / (self.peak_tflops * 1e12),
                       "step_time_s": elapsed / interval_steps}
                for callback in self.callbacks:
                    rec.update(callback.metrics(self, st["step"]))
                self.metrics.log(rec)
                self.log(console_line(rec, self.total_steps, (last_step - st["step"]) * elapsed / interval_steps))
                loss_acc.zero_()
                interval_steps, t_interval = 0, time.perf_counter()
            if (tr.eval_interval and st["step"] % tr.eval_interval == 0) or st["step"] == last_step:
                last_val = self.evaluate()
                if last_val is not None:
                    self.metrics.log({"step": st["step"], "val_loss": last_val, "tokens": st["tokens"]})
                    self.log(f"step {st['step']:>6}/{self.total_steps} | val_loss {last_val:.4f}")
                t_interval = time.perf_counter()  # evaluation time is not training throughput
            interval = cfg.checkpoint.interval
            if (interval and st["step"] % interval == 0) or end:
                saved_at = self.save()
                self.log(f"checkpoint -> {saved_at}")
                t_interval = time.perf_counter()
        stop_signal.restore()
        if stop and self.rank == 0:
            preemption.mark(self.run_dir, st["step"])
            self.log(f"stopped by a signal after step {st['step']}; run again (train.resume: auto) to continue")
        profiler.stop()
        self.metrics.close()
        return {"step": st["step"], "val_loss": last_val, "checkpoint": saved_at, "preempted": stop}

    def sample(self, prompt: str, max_new_tokens: int) -> str | None:
        """A continuation of ``prompt``, drawn alike on every rank (all of them take part)."""
        if self.tokenizer is None or not prompt:
            return None
        self.model.eval()

        def next_logits(context: torch.Tensor) -> torch.Tensor:
            with devices.autocast(self.device, self.cfg.train.precision):
                return last_logits(self.model(context))

        ids = [self.tokenizer.bos] + self.tokenizer.encode(prompt)
        new = generate(self.pipeline.next_token_logits if self.pipeline else next_logits, ids, max_new_tokens,
                       max_seq_len=self.cfg.data.seq_len, device=self.device, eos_id=self.tokenizer.eos,
                       seed=self.cfg.train.seed, vocab_size=self.tokenizer.vocab_size)
        return prompt + self.tokenizer.decode(new)


def run_training(cfg: RunConfig, log=print) -> dict:
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log)
    log = trainer.log  # rank 0 only
    result = trainer.fit()
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
        log(f"  checkpoints: {trainer.ckpt_root}/")
        log(f"  metrics:     {run_dir / 'metrics.jsonl'}")
        if cfg.logging.tensorboard:
            log(f"  tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}")
    # Free the model, its parallel state and any collective's work objects while the interpreter is whole,
    # then the process groups: gloo work objects freed during interpreter shutdown can abort the process.
    del trainer, log  # (log is a bound method of the trainer)
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result
