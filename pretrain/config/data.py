"""The ``data:`` and ``tokenizer:`` sections: text sources or preprocessed blends, batch shape, and the
sentencepiece tokenizer trained from the sources."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pretrain.config.fields import option, require, require_all

# What `type: auto` reads by suffix (after a compression suffix, which `datasets` undoes).
SUFFIX_TYPES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def suffix_type(path: str) -> str | None:
    """The reader `type: auto` picks for ``path`` (a file or a glob), or None when its suffix says nothing."""
    suffixes = Path(path.rstrip("*")).suffixes
    while suffixes and suffixes[-1].lower() in COMPRESSION:
        suffixes.pop()
    return SUFFIX_TYPES.get(suffixes[-1].lower()) if suffixes else None


@dataclass(frozen=True)
class SourceConfig:
    path: str = option("", "Local file or glob (.txt/.jsonl/.json/.parquet), or a Hugging Face hub dataset name.")
    type: Literal["auto", "text", "json", "parquet", "hub"] = option(
        "auto", "How to read `path`: auto picks from the file suffix (never the network); hub loads a Hugging Face "
        "hub dataset by name.")
    text_field: str = option("text", "Column holding the document text (json, parquet, hub).")
    split: str = option("train", "Dataset split to read (`datasets` split syntax, e.g. train[:10%]).")
    name: str = option("", "Hub dataset configuration name, if it has several.")


@dataclass(frozen=True)
class BlendEntry:
    path: str = option("", "megatron-core IndexedDataset prefix (without .bin/.idx).")
    weight: float = option(1.0, "Relative sampling weight of this dataset in the blend.")


@dataclass(frozen=True)
class DataConfig:
    sources: list[SourceConfig] = option([], "Text sources read through HF datasets; empty = the embedded corpus.")
    blend: list[BlendEntry] = option([], "Existing megatron-core indexed datasets to train on (no preprocessing).")
    prefix: str = option("cache/corpus", "Output prefix of `pretrain preprocess` (PREFIX.bin/.idx) for `sources`.")
    split: str = option("98,2,0", "Megatron train,valid,test split of the documents (weights).")
    seq_len: int = option(256, "Tokens per sample (each sample reads seq_len+1 tokens for the shifted labels).")
    micro_batch_size: int = option(8, "Samples per forward/backward on one data-parallel rank.")
    global_batch_size: int = option(16, "Samples per optimizer step over all ranks (gradient accumulation fills it).")
    preprocess_workers: int = option(2, "Worker processes that tokenize documents during preprocessing.")
    embedded_docs: int = option(0, "Cap on documents of the embedded corpus (0 = all); small values speed tests.")
    prefetch: int = option(0, "Global batches read ahead by a background thread (pinned on cuda); 0 = read in the step.")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def check(self) -> None:
        require_all([("data.seq_len", self.seq_len), ("data.micro_batch_size", self.micro_batch_size),
                     ("data.global_batch_size", self.global_batch_size),
                     ("data.preprocess_workers", self.preprocess_workers)], 1, "at least 1")
        require_all([("data.embedded_docs", self.embedded_docs), ("data.prefetch", self.prefetch)], 0, "0 or more")
        require(self.global_batch_size % self.micro_batch_size == 0, "data.global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}.")
        require(not (self.sources and self.blend), "data.blend",
                "set either data.sources (text to preprocess) or data.blend (preprocessed datasets), not both.")
        try:
            weights = [float(x) for x in self.split.split(",")]
            ok = len(weights) == 3 and all(w >= 0 for w in weights) and weights[0] > 0
        except ValueError:
            ok = False
        require(ok, "data.split", f"got {self.split!r}; give three weights train,valid,test such as '98,2,0'.")
        for i, s in enumerate(self.sources):
            require(bool(s.path), f"data.sources[{i}].path", "is required: a file, a glob or a hub dataset name.")
            require(s.type != "auto" or suffix_type(s.path) is not None, f"data.sources[{i}].type",
                    f"the suffix of '{s.path}' says nothing pretrain reads (.txt, .md, .jsonl, .json, .parquet, also "
                    "compressed): set type to text, json or parquet for a local file, or to hub to load a Hugging "
                    "Face hub dataset of that name (over the network).")
        for i, b in enumerate(self.blend):
            require(bool(b.path), f"data.blend[{i}].path", "is required: an IndexedDataset prefix.")
            require(b.weight > 0, f"data.blend[{i}].weight", f"must be positive, got {b.weight}.")


@dataclass(frozen=True)
class TokenizerConfig:
    path: str = option("cache/tokenizer.model", "sentencepiece model file; trained from the corpus when missing.")
    type: Literal["bpe", "unigram"] = option("bpe", "sentencepiece model type.")
    vocab_size: int = option(8000, "Vocabulary size to train (includes unk/bos/eos/pad).")
    train_sentences: int = option(300_000, "Most lines sampled from the corpus to train the tokenizer.")

    def check(self) -> None:
        require_all([("tokenizer.train_sentences", self.train_sentences)], 1, "at least 1")
        require(self.vocab_size >= 16, "tokenizer.vocab_size", f"must be at least 16, got {self.vocab_size}.")
