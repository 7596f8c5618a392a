"""How well a tokenizer fits some text, measured before paying for a run: `pretrain tokenizer stats`.

Bytes per token (UTF-8 bytes of the text over its tokens: higher means shorter sequences for the same text),
tokens per word (words split on whitespace), the share of tokens that are unk or byte-fallback pieces (text
the vocabulary does not cover), and how much of the vocabulary the text uses. Each document (a line of a text
file) is encoded as in preprocessing, without the end-of-document token.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from pretrain.data.tokenizer import Tokenizer


def tokenizer_stats(tok: Tokenizer, docs: Iterable[str], batch: int = 256) -> dict:
    """The measures of ``tok`` on ``docs``, as a JSON-ready dict."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    n_docs = n_bytes = n_chars = n_words = 0
    it = iter(docs)
    while chunk := list(itertools.islice(it, batch)):
        ids = np.fromiter(itertools.chain.from_iterable(tok.sp.encode(chunk)), dtype=np.int64)
        counts += np.bincount(ids, minlength=tok.vocab_size)
        n_docs += len(chunk)
        n_bytes += sum(len(text.encode()) for text in chunk)
        n_chars += sum(map(len, chunk))
        n_words += sum(len(text.split()) for text in chunk)
    tokens = int(counts.sum())
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    unknown = int(counts[tok.sp.unk_id()])
    byte_fallback = int(counts[byte_ids].sum()) if byte_ids else 0
    used = int((counts > 0).sum())

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 6) if b else None

    return {
        "tokenizer": str(tok.path), "digest": tok.digest, "vocab_size": tok.vocab_size,
        "documents": n_docs, "bytes": n_bytes, "characters": n_chars, "words": n_words, "tokens": tokens,
        "bytes_per_token": ratio(n_bytes, tokens), "characters_per_token": ratio(n_chars, tokens),
        "tokens_per_word": ratio(tokens, n_words),
        "unknown_tokens": unknown, "unknown_rate": ratio(unknown, tokens),
        "byte_fallback_tokens": byte_fallback, "byte_fallback_rate": ratio(byte_fallback, tokens),
        "vocab_used": used, "vocab_used_fraction": ratio(used, tok.vocab_size),
    }


def format_stats(stats: dict, text: str) -> str:
    """The measures as a short table for the terminal; ``text`` says what was measured."""
    def pct(rate: float | None) -> str:
        return "-" if rate is None else f"{100 * rate:.3f}%"

    rows = [
        ("tokenizer", f"{stats['tokenizer']} ({stats['vocab_size']:,} pieces, digest {stats['digest']})"),
        ("text", f"{text}: {stats['documents']:,} documents, {stats['bytes']:,} bytes, {stats['words']:,} words"),
        ("tokens", f"{stats['tokens']:,}"),
        ("bytes per token", f"{stats['bytes_per_token'] or 0:.3f}"),
        ("tokens per word", f"{stats['tokens_per_word'] or 0:.3f}"),
        ("unknown", f"{pct(stats['unknown_rate'])} ({stats['unknown_tokens']:,} tokens)"),
        ("byte fallback", f"{pct(stats['byte_fallback_rate'])} ({stats['byte_fallback_tokens']:,} tokens)"),
        ("vocabulary used", f"{stats['vocab_used']:,} of {stats['vocab_size']:,} pieces "
                            f"({pct(stats['vocab_used_fraction'])})"),
    ]
    return "\n".join(f"{name:<16} {value}" for name, value in rows)
