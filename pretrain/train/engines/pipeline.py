"""The pipeline engine: this rank's pipeline stages run each step's micro-batches under the configured schedule
(``parallel/pipeline.py``), composed with data, tensor and expert parallelism inside each stage.

The step is the plain engine's, computed by stages: the same token-weighted loss (on the last stage, through
the schedule's loss function), the same gradients, then what pipelining adds: the tied embedding's gradient
parts summed over the two ranks that hold them, the loss brought to every rank, and a gradient norm over
every stage (the tied weight counted once). ``metrics`` reports the measured bubble and action times."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import RunConfig
from pretrain.data.loader import MicroBatch
from pretrain.parallel import plan
from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
from pretrain.parallel.mesh import ParallelDims
from pretrain.parallel.pipeline import PipelineSchedule
from pretrain.parallel.schedules import SPLIT_BACKWARD
from pretrain.train.engines.base import Engine
from pretrain.train.engines.loss import lm_loss_sum

METRICS = ("bubble_fraction", "peak_memory_mb", "f_ms", "i_ms", "w_ms", "b_ms")
PER_RANK = ("bubble_fraction", "peak_memory_mb")


class PipelineEngine(Engine):
    def __init__(self, cfg: RunConfig, dims: ParallelDims, device: torch.device, start_step: int = 0):
        super().__init__(cfg, dims, device)
        model = self.build_model(start_step)
        # ``model`` keeps only this rank's stages (under their global names); the schedule runs them.
        self.pipeline = PipelineSchedule(model, dims, self.layout_cfg, device, self.moe)
        split_backward = cfg.parallel.pp_schedule in SPLIT_BACKWARD
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing, split_backward)  # before FSDP
        plan.parallelize(model, dims, cfg, self.pipeline.modules)
        self.model = model
        self.prepare(compile_the_loss=False)

    def forward_backward(self, micro_batches: list[MicroBatch], measure: bool = False) -> torch.Tensor:
        n_tokens = self.global_tokens(micro_batches)
        micro_batches = [mb.to(self.device) for mb in micro_batches]
        lm_losses: dict[int, torch.Tensor] = {}

        def loss_fn(logits: torch.Tensor, i: int) -> torch.Tensor:
            loss = lm_loss_sum(logits, micro_batches[i]) / n_tokens
            lm_losses[i] = loss.detach()
            return loss * self.grad_scale

        with self.loss_context():
            self.pipeline.run([mb.tokens for mb in micro_batches], loss_fn, measure)
        loss = torch.stack(list(lm_losses.values())).sum() if lm_losses else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.pipeline.group)  # only the last stage computed it
        plan.finish_gradients(self.model, self.dims, self.cfg)
        self.pipeline.sync_tied_grads()
        return loss

    def norm_params(self) -> list[nn.Parameter]:
        return self.pipeline.norm_params()

    def norm_group(self) -> dist.ProcessGroup:
        return self.pipeline.group

    def eval_loss_sum(self, mb: MicroBatch) -> torch.Tensor | None:
        logits = self.pipeline.forward_only(mb.tokens)
        if logits is None:
            return None
        with self.loss_context():
            return lm_loss_sum(logits, mb)

    def sum_eval_losses(self, loss: torch.Tensor) -> None:
        dist.all_reduce(loss, group=self.pipeline.group)

    def next_token_logits(self, context: torch.Tensor) -> torch.Tensor:
        return self.pipeline.next_token_logits(context)

    def metrics(self) -> dict:
        """Per pipeline rank, from the last measured step: the bubble fraction (idle share of the schedule's wall
        time), peak memory, and mean milliseconds per F, I, W and B action; means over the ranks too."""
        measured = self.pipeline.measured
        mine = torch.tensor([measured.get(k, float("nan")) for k in METRICS], dtype=torch.float64, device=self.device)
        ranks = [torch.empty_like(mine) for _ in range(self.cfg.parallel.pp)]
        dist.all_gather(ranks, mine, group=self.pipeline.group)
        table = torch.stack(ranks).cpu()
        record = {}
        for column, key in enumerate(METRICS):
            values = table[:, column]
            if torch.isnan(values).all():
                continue
            if key in PER_RANK:
                record.update({f"pp/{key}/rank{r}": float(v) for r, v in enumerate(values)})
            record[f"pp/{key}"] = float(values[~torch.isnan(values)].mean())
        return record
