"""sentencepiece tokenizers (BPE or unigram): training from the configured corpus, and loading.

Special ids are fixed: unk 0, bos 1, eos 2, pad 3. Byte fallback keeps every input encodable.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from pretrain.config import DataConfig, TokenizerConfig
from pretrain.errors import UserError
from pretrain.paths import require_writable_dir

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class Tokenizer:
    """A loaded sentencepiece model; also what megatron-core's GPTDataset reads (eod, pad, vocab_size)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            raise UserError(f"tokenizer.path '{path}' is a directory; give the path of a sentencepiece .model file "
                            "(it is trained there from the corpus when missing).")
        if not path.is_file():
            raise UserError(f"tokenizer model '{path}' does not exist; run `pretrain tokenizer train CONFIG` "
                            "or `pretrain train CONFIG`, which trains it from the configured corpus.")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"tokenizer.path '{path}' is not a sentencepiece model ({str(e).strip()[:200]}); point it "
                            "at a .model file, or at a path that does not exist yet to train one there.") from None
        self.digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.unique_identifiers = {"class": "pretrain.Tokenizer", "sha256": self.digest}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos(self) -> int:
        return self.sp.bos_id()

    @property
    def eos(self) -> int:
        return self.sp.eos_id()

    eod = eos

    @property
    def pad(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def _training_lines(docs: Iterator[str], limit: int) -> Iterator[str]:
    lines = (line for doc in docs for line in doc.splitlines() if line.strip())
    return itertools.islice(lines, limit)


def _keeping_errors(docs: Iterator[str], errors: list[UserError]) -> Iterator[str]:
    try:
        yield from docs
    except UserError as e:
        errors.append(e)
        raise


def train_tokenizer(tok: TokenizerConfig, data: DataConfig, docs: Iterator[str] | None = None) -> Tokenizer:
    """Train a sentencepiece model on the configured corpus and write it to ``tok.path`` atomically."""
    from pretrain.data.corpus import documents

    path = Path(tok.path)
    if path.is_dir():
        raise UserError(f"tokenizer.path '{path}' is a directory; give the path of the .model file to train.")
    require_writable_dir(path.parent, "the directory of tokenizer.path")
    tmp_prefix = path.with_name(path.stem + ".tmp")
    errors: list[UserError] = []  # sentencepiece turns an error inside the iterator into its own RuntimeError
    lines = _training_lines(_keeping_errors(docs if docs is not None else documents(data), errors), tok.train_sentences)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=str(tmp_prefix), vocab_size=tok.vocab_size,
            model_type=tok.type, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, normalization_rule_name="identity",
            character_coverage=0.9995, max_sentence_length=1 << 14, num_threads=2,
            minloglevel=2, hard_vocab_limit=True)
    except RuntimeError as e:
        if errors:
            raise errors[0] from None
        raise UserError(f"sentencepiece could not train a {tok.vocab_size}-piece {tok.type} tokenizer on this "
                        f"corpus ({e}); change tokenizer.vocab_size as that message says, or train on more text.") from None
    Path(str(tmp_prefix) + ".model").replace(path)
    Path(str(tmp_prefix) + ".vocab").replace(path.with_suffix(".vocab"))
    return Tokenizer(path)
