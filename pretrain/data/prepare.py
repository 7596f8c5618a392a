"""What a run needs before its first step: a tokenizer and indexed data, built when missing or stale."""

from __future__ import annotations

from pathlib import Path

from pretrain.config import RunConfig
from pretrain.data import corpus
from pretrain.data.preprocess import is_current, preprocess
from pretrain.data.tokenizer import Tokenizer, train_tokenizer
from pretrain.paths import require_writable_dir


def ensure_tokenizer(cfg: RunConfig, log=print) -> Tokenizer | None:
    """Load the tokenizer, training it first when the model file is missing. With ``data.blend`` (already
    tokenized data) there is no text to train on: the tokenizer is optional and model.vocab_size required."""
    path = Path(cfg.tokenizer.path)
    if path.exists():
        return Tokenizer(path)  # (a directory or a file that is no model: named there)
    if cfg.data.blend:
        return None
    log(f"training a {cfg.tokenizer.vocab_size}-piece {cfg.tokenizer.type} tokenizer -> {path}")
    return train_tokenizer(cfg.tokenizer, cfg.data)


def ensure_data(cfg: RunConfig, tokenizer: Tokenizer | None, log=print) -> list[tuple[str, float]]:
    """The (prefix, weight) blend to train on, preprocessing the configured text when needed."""
    if cfg.data.blend:
        return [(b.path, b.weight) for b in cfg.data.blend]
    assert tokenizer is not None
    require_writable_dir(Path(cfg.data.prefix).parent, "the directory of data.prefix")
    fp = corpus.fingerprint(cfg.data)
    if not is_current(cfg.data.prefix, fp, tokenizer):
        what = "the embedded corpus" if not cfg.data.sources else f"{len(cfg.data.sources)} source(s)"
        log(f"preprocessing {what} -> {cfg.data.prefix}.bin/.idx")
        preprocess(corpus.documents(cfg.data), tokenizer, cfg.data.prefix,
                   workers=cfg.data.preprocess_workers, fingerprint=fp)
    return [(cfg.data.prefix, 1.0)]
