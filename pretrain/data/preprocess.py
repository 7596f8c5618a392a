"""Text -> token ids -> a megatron-core IndexedDataset (PREFIX.bin / PREFIX.idx).

Documents are tokenized in worker processes (order kept), each document ends with eos, and the files
are written through megatron-core's own ``IndexedDatasetBuilder`` under a temporary name and renamed
when complete. ``PREFIX.json`` records what was tokenized with what, so stale files are rebuilt.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError

_worker_tok: Tokenizer | None = None


def _init_worker(path: str, worker_process: bool = True) -> None:
    global _worker_tok
    if worker_process:  # (not in the main process: its torch threads are the training's)
        torch.set_num_threads(1)
    _worker_tok = Tokenizer(path)


def _encode_chunk(docs: list[str]) -> list[list[int]]:
    assert _worker_tok is not None
    eos = _worker_tok.eos
    return [ids + [eos] for ids in _worker_tok.sp.encode(docs)]


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def is_current(prefix: str | Path, fingerprint: str, tokenizer: Tokenizer) -> bool:
    """True when PREFIX.bin/.idx exist and were built from this text with this tokenizer."""
    meta = meta_path(prefix)
    if not (meta.is_file() and Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        return False
    info = json.loads(meta.read_text())
    return info.get("fingerprint") == fingerprint and info.get("tokenizer") == tokenizer.digest


def preprocess(docs: Iterable[str], tokenizer: Tokenizer, prefix: str | Path, *, workers: int = 2,
               fingerprint: str = "", chunk_size: int = 16) -> dict:
    """Tokenize ``docs`` into PREFIX.bin/.idx; returns the summary also written to PREFIX.json."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + ".tmp")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    n_docs = n_tokens = 0
    t0 = time.perf_counter()
    columns = [TextColumn("[bold]tokenizing"), TextColumn("{task.fields[docs]:,} docs"),
               TextColumn("{task.fields[tokens]:,} tokens"), TextColumn("{task.fields[rate]:,.0f} tok/s"),
               TimeElapsedColumn()]
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer.path),)) if workers > 1 else None
    try:
        if pool is None:
            _init_worker(str(tokenizer.path), worker_process=False)
            encoded = map(_encode_chunk, _chunks(docs, chunk_size))
        else:
            encoded = pool.imap(_encode_chunk, _chunks(docs, chunk_size))
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task("tokenize", docs=0, tokens=0, rate=0.0)
            for chunk in encoded:
                for ids in chunk:
                    builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                    n_docs += 1
                    n_tokens += len(ids)
                progress.update(task, docs=n_docs, tokens=n_tokens,
                                rate=n_tokens / max(time.perf_counter() - t0, 1e-9))
    finally:
        if pool is not None:
            pool.terminate()
    if n_tokens == 0:  # nothing to train on: say so now, not as an empty-file error when a run maps it
        Path(f"{tmp}.bin").unlink(missing_ok=True)
        raise UserError("the configured text holds no tokens (no document with text: empty or blank files, or "
                        "values of the text field that are not strings); check the files of data.sources and each "
                        "source's text_field.")
    builder.finalize(f"{tmp}.idx")
    Path(f"{tmp}.bin").replace(f"{prefix}.bin")
    Path(f"{tmp}.idx").replace(f"{prefix}.idx")
    shutil.rmtree(Path(f"{prefix}") / "cache", ignore_errors=True)  # megatron-core's indices of the old data
    seconds = time.perf_counter() - t0
    info = {"documents": n_docs, "tokens": n_tokens, "seconds": round(seconds, 2),
            "fingerprint": fingerprint, "tokenizer": tokenizer.digest, "tokenizer_path": str(tokenizer.path)}
    meta_path(prefix).write_text(json.dumps(info, indent=1) + "\n")
    print(f"preprocessed {n_docs:,} documents, {n_tokens:,} tokens in {seconds:.1f}s "
          f"({n_tokens / max(seconds, 1e-9):,.0f} tok/s) -> {prefix}.bin/.idx", flush=True)
    return info
