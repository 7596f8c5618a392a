"""Sampling a continuation from a trained model (no KV cache: for short demo samples)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor


def last_logits(logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits of a (1, seq, vocab) output, whole on every rank when vocab-sharded under
    tensor parallelism (a collective: every tensor-parallel rank calls it)."""
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return logits[0, -1].float()


@torch.no_grad()
def generate(next_logits: Callable[[torch.Tensor], torch.Tensor], ids: list[int], max_new_tokens: int, *,
             max_seq_len: int, device: torch.device, temperature: float = 0.8, top_k: int = 40,
             eos_id: int | None = None, seed: int = 0, vocab_size: int | None = None) -> list[int]:
    """Top-k sampling (greedy when temperature is 0); stops at eos. Returns only the new ids.
    ``next_logits`` maps the context (1, seq) on ``device`` to the next token's logits (vocab,); every rank
    that gets the same logits draws the same ids, so ranks that call it together agree on each token. With
    ``vocab_size`` only the tokenizer's ids are drawn, never the padding rows of a padded embedding."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([tokens[-max_seq_len:]], dtype=torch.long, device=device)
        logits = next_logits(context)[:vocab_size].float().cpu()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            values, indices = torch.topk(logits / temperature, min(top_k, logits.numel()))
            next_id = int(indices[torch.multinomial(values.softmax(-1), 1, generator=gen)])
        if next_id == eos_id:
            break
        tokens.append(next_id)
    return tokens[len(ids):]
