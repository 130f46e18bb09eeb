"""Key/value cache for incremental decoding: prefill once, then one token at a time.

Attention at position t needs the keys and values of positions 0..t of every layer.
Recomputing them each step costs a full forward per token; the cache keeps them,
so a step runs the model on the new tokens only. Create one with
`Llama.new_kv_cache(batch_size, max_len)` and pass it to `Llama.forward(idx, cache)`.

Memory is preallocated once (gpt-fast style), so decoding never reallocates:
per layer 2 * batch_size * n_kv_head * max_len * head_dim elements.
"""

import torch


class KVCache:
    """Keys and values of every layer for positions 0 .. length-1.

    k[i], v[i]: [batch_size, n_kv_head, max_len, head_dim] for layer i. Only the kv heads are
    stored (grouped-query attention repeats them at attention time), so a model with one kv
    head caches 1/n_head of what plain multi-head attention would. Keys are stored after RoPE:
    a key's rotation depends only on its own position, which never changes.

    Positions >= length hold stale or zero values and are never read (attention slices
    to the filled prefix), so `reset` does not need to clear them.

    The cache is not differentiable in a useful way (each step overwrites slices in place);
    decode under `torch.no_grad()` or `torch.inference_mode()`.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.batch_size = batch_size
        self.max_len = max_len
        shape = (batch_size, n_kv_head, max_len, head_dim)
        # Zeros, not empty: nothing reads the tail, but garbage (NaN) in memory is a
        # bad thing to debug if that ever changes.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0  # positions 0 .. length-1 are filled, in every layer

    def reset(self) -> None:
        """Start a new sequence in the same memory."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v: [B, n_kv_head, T, hd] of `layer` at positions length .. length+T-1 and
        return that layer's keys and values for positions 0 .. length+T-1: [B, n_kv_head, length+T, hd].

        Does not advance `length`: every layer writes the same positions in one forward,
        and the model advances it once, after the last layer (`advance`).
        """
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens
