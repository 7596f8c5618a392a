"""The ``data:`` and ``tokenizer:`` sections: text sources or preprocessed blends, batch shape, and the
sentencepiece tokenizer (a named one of the repository's ``tokenizers/`` folder, or a model file); and the
recipe a named tokenizer is trained from (``tokenizers/NAME.yaml``)."""

from __future__ import annotations

import dataclasses
import re
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


def check_sources(sources: list[SourceConfig], key: str) -> None:
    for i, s in enumerate(sources):
        require(bool(s.path), f"{key}[{i}].path", "is required: a file, a glob or a hub dataset name.")
        require(s.type == "hub" or not Path(s.path).is_dir(), f"{key}[{i}].path",
                f"'{s.path}' is a directory; give its files with a glob such as '{Path(s.path) / '*.txt'}' (or "
                "type: hub for a Hugging Face dataset saved there).")
        require(s.type != "auto" or suffix_type(s.path) is not None, f"{key}[{i}].type",
                f"the suffix of '{s.path}' says nothing pretrain reads (.txt, .md, .jsonl, .json, .parquet, also "
                "compressed): set type to text, json or parquet for a local file, or to hub to load a Hugging "
                "Face hub dataset of that name (over the network).")


@dataclass(frozen=True)
class BlendEntry:
    path: str = option("", "megatron-core IndexedDataset prefix (without .bin/.idx).")
    weight: float = option(1.0, "Relative sampling weight of this dataset in the blend.")


@dataclass(frozen=True)
class DataConfig:
    sources: list[SourceConfig] = option([], "Text sources read through HF datasets; empty = the embedded corpus.")
    blend: list[BlendEntry] = option([], "Existing megatron-core indexed datasets to train on (no preprocessing).")
    prefix: str = option("cache/corpus", "Where the tokenized text goes: PREFIX-DIGEST.bin/.idx, DIGEST naming the "
                         "tokenizer's content, so each tokenizer has its own token files.")
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
        require(ok, "data.split", f"got {self.split!r}; give three weights train,valid,test such as '98,2,0' (none "
                "negative, the training weight above 0).")
        check_sources(self.sources, "data.sources")
        require(bool(self.prefix) and not self.prefix.endswith(("/", "\\")), "data.prefix",
                f"{self.prefix!r} names a folder; the token files are PREFIX-DIGEST.bin/.idx, so give a folder and a "
                f"file stem, e.g. data.prefix={self.prefix or 'cache/'}corpus.")
        for i, b in enumerate(self.blend):
            require(bool(b.path), f"data.blend[{i}].path", "is required: an IndexedDataset prefix.")
            require(b.weight > 0, f"data.blend[{i}].weight", f"must be positive, got {b.weight}.")


TOKENIZER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class TokenizerConfig:
    name: str = option("", "A tokenizer of the repository's tokenizers/ folder, e.g. pydoc-bpe-8k (its shipped model, "
                       "or trained there from tokenizers/NAME.yaml when missing); set name or path, not both.")
    path: str = option("cache/tokenizer.model", "sentencepiece model file, or a folder holding tokenizer.model (an "
                       "imported tokenizer, a Hugging Face directory); a missing file is trained there from the run's "
                       "data with the three keys below.")
    type: Literal["bpe", "unigram"] = option("bpe", "sentencepiece model type (training tokenizer.path).")
    vocab_size: int = option(8000, "Vocabulary size (training tokenizer.path; includes unk/bos/eos/pad).")
    train_sentences: int = option(300_000, "Most lines read from the data to train tokenizer.path.")

    def check(self) -> None:
        require_all([("tokenizer.train_sentences", self.train_sentences)], 1, "at least 1")
        require(self.vocab_size >= 16, "tokenizer.vocab_size", f"must be at least 16, got {self.vocab_size}.")
        if not self.name:
            return
        require(TOKENIZER_NAME.fullmatch(self.name) is not None, "tokenizer.name",
                f"'{self.name}' is not a tokenizer name (letters, digits, '.', '_', '-'); to use a model file or a "
                "folder, set tokenizer.path instead.")
        default = TokenizerConfig()
        require(self.path == default.path, "tokenizer.name",
                f"'{self.name}' and tokenizer.path '{self.path}' both name the tokenizer: keep one of them.")
        for key in ("type", "vocab_size", "train_sentences"):
            require(getattr(self, key) == getattr(default, key), f"tokenizer.{key}",
                    f"trains a tokenizer at tokenizer.path, but the run uses the named tokenizer '{self.name}', which "
                    f"its recipe tokenizers/{self.name}.yaml makes: remove tokenizer.{key}, or write a recipe with "
                    "this setting (`pretrain tokenizer train RECIPE`) and name it.")


@dataclass(frozen=True)
class TokenizerRecipe:
    """How a named tokenizer is made: ``tokenizers/NAME.yaml``. Our recipes fix the special ids unk 0, bos 1,
    eos 2, pad 3; the tokens listed here follow them."""

    sources: list[SourceConfig] = option([], "Text to train on, read like data.sources; empty = the embedded corpus.")
    embedded_docs: int = option(0, "Cap on documents of the embedded corpus (0 = all).")
    type: Literal["bpe", "unigram"] = option("bpe", "sentencepiece model type.")
    vocab_size: int = option(8000, "Pieces in all, special and listed tokens included.")
    character_coverage: float = option(0.9995, "Share of the text's characters that get a piece of their own; the "
                                       "rarest others become byte pieces (byte_fallback) or unk.")
    byte_fallback: bool = option(True, "Spell a character that has no piece as its UTF-8 bytes instead of unk.")
    split_digits: bool = option(True, "Every digit is a piece of its own.")
    special_tokens: list[str] = option([], "Control tokens (e.g. <|im_start|>): ids of their own that no text "
                                       "encodes to.")
    user_defined_tokens: list[str] = option([], "Tokens that are always one piece where they occur in the text.")
    max_lines: int = option(0, "Stop reading the sources after this many non-empty lines (0 = read them all).")
    sample_lines: int = option(0, "Train on this many lines drawn uniformly (seeded) from all lines read, holding "
                               "only those in memory; 0 = train on every line read.")
    seed: int = option(0, "Seed of the line sampling.")
    num_threads: int = option(2, "Threads sentencepiece trains with (recorded in the model file).")

    def check(self) -> None:
        require_all([("embedded_docs", self.embedded_docs), ("max_lines", self.max_lines),
                     ("sample_lines", self.sample_lines)], 0, "0 or more")
        require_all([("num_threads", self.num_threads)], 1, "at least 1")
        reserved = 4 + len(self.special_tokens) + len(self.user_defined_tokens)
        require(self.vocab_size >= max(16, reserved + 1), "vocab_size",
                f"must be at least 16 and above the {reserved} special and listed tokens, got {self.vocab_size}.")
        require(0 < self.character_coverage <= 1, "character_coverage",
                f"must lie in (0, 1], got {self.character_coverage}.")
        tokens = self.special_tokens + self.user_defined_tokens
        require(all(tokens) and len(set(tokens)) == len(tokens), "special_tokens",
                "the special and user-defined tokens must be non-empty and distinct.")
        check_sources(self.sources, "sources")

    def data(self) -> DataConfig:
        """The text to read, as the corpus readers take it."""
        return DataConfig(sources=self.sources, embedded_docs=self.embedded_docs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
