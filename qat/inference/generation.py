"""Sampling from a (quantized or packed) Llama, with a KV cache: prefill the prompt once,
then one token at a time against the cached keys and values."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """One token from the last position's logits [vocab] (temperature <= 0: greedy)."""
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator))


def sample_text(tokenizer, prompt: Sequence[int], new: Sequence[int]) -> str:
    """The prompt and its continuation as one text. Decoded as one sequence: a tokenizer whose
    decoder inserts the spacing (word-level, SentencePiece's leading-space marks) would run the
    two together if each were decoded on its own. Separator and begin-of-text ids are dropped."""
    drop = {tokenizer.eos_id, getattr(tokenizer, "bos_id", None)}
    return tokenizer.decode([t for t in [*prompt, *new] if t not in drop])


@torch.no_grad()
def generate(
    net: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    max_seq_len: int | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Autoregressive sampling with the model's own (quantized) forward; returns the new tokens.

    use_cache: decode against a KV cache (`net(idx, cache)`), else recompute the whole
    context for every token. Both see the same context: at most the last `max_seq_len`
    tokens. A cache cannot slide (RoPE positions are absolute), so once the sequence
    outgrows max_seq_len the window is prefilled afresh, exactly as recompute does.
    """
    if not prompt:
        raise ValueError("prompt is empty; start from at least one token (e.g. the end-of-text id)")
    device = next(net.parameters()).device
    window = max_seq_len or getattr(getattr(net, "cfg", None), "max_seq_len", None) or len(prompt) + max_new_tokens
    ids = list(prompt)
    cache = net.new_kv_cache(1, min(window, len(ids) + max_new_tokens)) if use_cache else None
    fed = 0  # how many of ids (from the window's start) the cache holds
    for _ in range(max_new_tokens):
        context = ids[-window:]
        if cache is None:
            logits = net(torch.tensor([context], device=device))
        else:
            if len(ids) > window or cache.length + len(ids) - fed > cache.max_len:
                cache.reset()  # the window slid: positions restart at 0, as in recompute
                fed = len(ids) - len(context)
            logits = net(torch.tensor([ids[fed:]], device=device), cache, last_only=True)
            fed = len(ids)
        nxt = next_token(logits[0, -1], temperature, top_k, generator)
        ids.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    return ids[len(prompt) :]
