"""Samples from megatron-core's GPTDataset / BlendedDataset, batched by a global sample position.

The data position is one integer, the number of samples consumed over all ranks, so a run resumes
under any data-parallel layout. Each optimizer step takes the next ``global_batch_size`` samples;
data-parallel rank r reads the r-th contiguous slice of them, in micro-batches. ``PrefetchedBatches``
reads the next steps' batches in a background thread; a batch stays a pure function of its position, so
prefetching changes no sample and resuming stays exact.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from pretrain.config import RunConfig
from pretrain.errors import UserError


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # (micro_batch, seq) int64
    labels: torch.Tensor  # (micro_batch, seq) int64, tokens shifted by one
    loss_mask: torch.Tensor  # (micro_batch, seq) float

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(*(t.to(device, non_blocking=True) for t in (self.tokens, self.labels, self.loss_mask)))

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies, so ``to(cuda, non_blocking=True)`` overlaps the copy with compute."""
        return MicroBatch(*(t.pin_memory() for t in (self.tokens, self.labels, self.loss_mask)))


class TokenIds:
    """What GPTDataset needs of a tokenizer when the data is already tokenized and no tokenizer exists:
    pad -1 never matches a real id, so no token is masked or rewritten."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod, self.pad = vocab_size, -1, -1
        self.unique_identifiers = {"class": "pretrain.TokenIds", "vocab_size": vocab_size}


def data_key(blend: list[tuple[str, float]], sample: int = 4 << 20) -> str:
    """A digest of the data itself: each prefix's file sizes and the head and tail of its .idx (the document
    lengths and offsets). megatron-core keys its sample-index cache by the dataset config alone, so without
    this a corpus rebuilt under the same prefix (other documents, tokenizer or machine) would be read through
    the old indices. Reads at most 8 MiB per prefix, and is the same for every copy of the same files."""
    h = hashlib.sha1()
    for prefix, _ in blend:
        h.update(f"{prefix}:{os.path.getsize(f'{prefix}.bin')}:".encode())
        with open(f"{prefix}.idx", "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"{size}:".encode() + f.read(sample))
            if size > sample:
                f.seek(max(sample, size - sample))
                h.update(f.read())
    return h.hexdigest()[:16]


def index_cache(cache_dir: Path, blend: list[tuple[str, float]]) -> str | None:
    """Where megatron-core caches its sample indices (rank 0 writes, the others wait at a barrier and read):
    one folder per version of the data. Left unset, GPTDataset caches next to the data, keyed by the config
    alone, which the blend of a single process must accept: megatron-core's BlendedDataset asks for the
    process group's rank before writing its cache (``preprocess`` clears that folder when it rebuilds)."""
    if len(blend) > 1 and not dist.is_initialized():
        return None
    return str(cache_dir / data_key(blend))


def build_datasets(cfg: RunConfig, blend: list[tuple[str, float]], tokenizer, cache_dir: Path,
                   train_samples: int, valid_samples: int):
    """(train, valid) datasets through megatron-core's builder; ``valid`` is None for a 0 valid split."""
    for prefix, _ in blend:
        if not IndexedDataset.exists(prefix):
            raise UserError(f"'{prefix}.bin/.idx' is not a megatron-core indexed dataset; check data.blend[].path "
                            "(a prefix without .bin/.idx) or run `pretrain preprocess CONFIG`.")
    for prefix, _ in blend:
        _check_split_documents(prefix, cfg.data.split)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed, sequence_length=cfg.data.seq_len,
        blend=([p for p, _ in blend], [w for _, w in blend] if len(blend) > 1 else None),
        split=cfg.data.split, path_to_cache=index_cache(cache_dir, blend),
        tokenizer=tokenizer if tokenizer is not None else TokenIds(cfg.model.vocab_size),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build()
    if train is None or len(train) == 0:
        raise UserError("the training split holds no complete sample: add data or lower data.seq_len.")
    return train, valid


def _check_split_documents(prefix: str, split: str) -> None:
    """Every split of nonzero weight gets at least one sequence of ``prefix``: megatron-core cuts each dataset's
    sequences at the rounded split fractions (computed here as it does) and builds every split of nonzero weight,
    and one without sequences loops forever in its epoch count."""
    sequences = len(IndexedDataset(prefix).sequence_lengths)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    weights = split.split(",")
    for i, (name, bounds) in enumerate(zip(("training", "validation", "test"), matrix, strict=True)):
        if bounds is None or int(round(bounds[0] * float(sequences))) != int(round(bounds[1] * float(sequences))):
            continue
        zero = ",".join("0" if j == i else w.strip() for j, w in enumerate(weights))
        fix = ("add data or raise the training weight" if i == 0 else
               f"add data, raise its weight, or give it weight 0 (data.split={zero}: "
               f"{'no validation loss' if i == 1 else 'no test split'})")
        raise UserError(f"data.split {split} gives the {name} split none of the {sequences} documents (sequences) of "
                        f"'{prefix}': {fix}.")


class GlobalBatches:
    """Micro-batches of one data-parallel rank for the global batch starting at a sample position."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 vocab_size: int | None = None):
        """``vocab_size``: every token id must be below it (checked on the host, per micro-batch: an id beyond the
        embedding would fail on a CPU and crash a GPU kernel)."""
        self.vocab_size = vocab_size
        per_rank = global_batch_size // dp_size
        if per_rank * dp_size != global_batch_size or per_rank % micro_batch_size:
            raise UserError(f"data.global_batch_size {global_batch_size} must split into {dp_size} data-parallel "
                            f"ranks x whole micro-batches of {micro_batch_size}; adjust the batch sizes.")
        self.dataset, self.gbs, self.mbs = dataset, global_batch_size, micro_batch_size
        self.start, self.per_rank = dp_rank * per_rank, per_rank

    def __call__(self, position: int) -> list[MicroBatch]:
        first = position + self.start
        return [self._collate(range(i, i + self.mbs)) for i in range(first, first + self.per_rank, self.mbs)]

    def _collate(self, indices: range) -> MicroBatch:
        n = len(self.dataset)
        samples = [self.dataset[i % n] for i in indices]
        batch = MicroBatch(torch.stack([s["tokens"] for s in samples]), torch.stack([s["labels"] for s in samples]),
                           torch.stack([s["loss_mask"] for s in samples]).float())
        if self.vocab_size is not None:
            largest = int(torch.maximum(batch.tokens.max(), batch.labels.max()))
            if largest >= self.vocab_size:
                raise UserError(f"the data holds token id {largest} (samples {indices.start}-{indices.stop - 1}), but "
                                f"model.vocab_size is {self.vocab_size}: the data was made with a larger tokenizer. Set "
                                f"model.vocab_size to at least {largest + 1}, or point tokenizer.path at the tokenizer "
                                "that made the data.")
        return batch


class PrefetchedBatches:
    """``GlobalBatches`` read ahead: after the batch at position p is asked for, a background thread
    prepares the batches at p + step, ..., p + depth * step (pinned when ``pin``). A position that was not
    predicted (e.g. the data starting over) is read on the spot and the read-ahead restarts from it."""

    def __init__(self, batches: GlobalBatches, depth: int, pin: bool = False):
        self.batches, self.depth, self.pin = batches, depth, pin
        self.step = batches.gbs
        self.pending: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    def _read(self, position: int) -> list[MicroBatch]:
        micro_batches = self.batches(position)
        return [mb.pin_memory() for mb in micro_batches] if self.pin else micro_batches

    def __call__(self, position: int) -> list[MicroBatch]:
        future = self.pending.pop(position, None)
        ahead = [position + i * self.step for i in range(1, self.depth + 1)]
        for stale in set(self.pending) - set(ahead):
            self.pending.pop(stale).cancel()
        for p in ahead:
            if p not in self.pending:
                self.pending[p] = self.pool.submit(self._read, p)
        return future.result() if future is not None else self._read(position)

    def close(self) -> None:
        """Cancel what is read ahead and stop the thread."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def read_ahead(batches: GlobalBatches, depth: int, pin: bool) -> GlobalBatches | PrefetchedBatches:
    """``batches`` themselves for depth 0, else a prefetching view of them."""
    return PrefetchedBatches(batches, depth, pin) if depth else batches
