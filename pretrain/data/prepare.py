"""What a run needs before its first step: a tokenizer and indexed data, built when missing or stale."""

from __future__ import annotations

from pathlib import Path

from pretrain.config import DataConfig, RunConfig
from pretrain.data import corpus
from pretrain.data.preprocess import is_current, preprocess
from pretrain.data.tokenizer import Tokenizer, named_tokenizer, train_tokenizer
from pretrain.paths import require_writable_dir


def ensure_tokenizer(cfg: RunConfig, log=print) -> Tokenizer | None:
    """Load the tokenizer: a named one of tokenizers/ (trained from its recipe when it has no model yet), or the
    model at tokenizer.path, trained first from the run's data when missing. With ``data.blend`` (already
    tokenized data) there is no text to train on: the tokenizer is optional and model.vocab_size required."""
    if cfg.tokenizer.name:
        return named_tokenizer(cfg.tokenizer.name, log)
    path = Path(cfg.tokenizer.path)
    if path.exists():
        return Tokenizer(path)  # (a file that is no model, or a folder without one: named there)
    if cfg.data.blend:
        return None
    log(f"training a {cfg.tokenizer.vocab_size}-piece {cfg.tokenizer.type} tokenizer -> {path}")
    return train_tokenizer(cfg.tokenizer, cfg.data, log)


def token_prefix(data: DataConfig, tokenizer: Tokenizer) -> str:
    """Where the configured text tokenized by ``tokenizer`` lives: the tokenizer's content digest is part of the
    name, so token files made with another tokenizer are never read, and several tokenizers share one cache."""
    return f"{data.prefix}-{tokenizer.digest}"


def ensure_data(cfg: RunConfig, tokenizer: Tokenizer | None, log=print) -> list[tuple[str, float]]:
    """The (prefix, weight) blend to train on, preprocessing the configured text when needed."""
    if cfg.data.blend:
        return [(b.path, b.weight) for b in cfg.data.blend]
    assert tokenizer is not None
    require_writable_dir(Path(cfg.data.prefix).parent, "the directory of data.prefix")
    prefix, fp = token_prefix(cfg.data, tokenizer), corpus.fingerprint(cfg.data)
    if not is_current(prefix, fp, tokenizer):
        what = "the embedded corpus" if not cfg.data.sources else f"{len(cfg.data.sources)} source(s)"
        log(f"preprocessing {what} -> {prefix}.bin/.idx")
        preprocess(corpus.documents(cfg.data), tokenizer, prefix, workers=cfg.data.preprocess_workers, fingerprint=fp)
    return [(prefix, 1.0)]
