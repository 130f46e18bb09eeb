"""A plain Llama-style decoder: RMSNorm, RoPE, (grouped-query) attention, SwiGLU.

This file knows nothing about quantization. Every matmul that QAT may quantize
is an ordinary `nn.Linear` submodule called as a module, so a converter can swap
it after the model is built (see the attribute names below; the rest of the
project relies on them):

    embed                      nn.Embedding
    layers.{i}.attn_norm       RMSNorm
    layers.{i}.attn.qkv        nn.Linear  d -> (n_head + 2*n_kv_head) * head_dim
    layers.{i}.attn.proj       nn.Linear  n_head * head_dim -> d
    layers.{i}.mlp_norm        RMSNorm
    layers.{i}.mlp.gate        nn.Linear  d -> hidden
    layers.{i}.mlp.up          nn.Linear  d -> hidden
    layers.{i}.mlp.down        nn.Linear  hidden -> d
    norm                       RMSNorm
    lm_head                    nn.Linear  d -> vocab   (shares embed.weight if tied)

Architecture and initialisation follow the QuEST training code: pre-norm
residual blocks, no biases, untied embeddings by default, N(0, 0.02) weights with
the residual output projections scaled down by 1/sqrt(2 * n_layer).

Incremental decoding: `model(idx, cache)` with `cache = model.new_kv_cache(B, max_len)`
runs only the new tokens, at positions cache.length onwards, against the cached keys
and values (see models/kv_cache.py). The linears still see [B, T, d] inputs and act on
each token row independently, so a cached step gives the values a full recompute gives.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from qat.models.kv_cache import KVCache
from qat.models.rope import RopeScaling, apply_rope, rope_table

__all__ = ["Llama", "LlamaConfig", "RopeScaling", "apply_rope", "flops_per_token", "rope_table"]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass
class LlamaConfig:
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int | None = None  # None = n_head (plain multi-head attention)
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_hidden: int | None = None  # None = QuEST's rule, see `ffn_dim`
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    head_size: int | None = None  # None = d_model // n_head; imported checkpoints may differ
    rope_scaling: RopeScaling | None = None  # Llama 3.1's frequency scaling; a dict is converted

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "multiple_of", "max_seq_len"):
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive int")
        for name in ("n_kv_head", "ffn_hidden"):
            value = getattr(self, name)
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{name}={value!r}: must be a positive int or None")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not _is_positive_number(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a positive number")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r}: must be True or False")
        if self.head_size is not None and not _is_positive_int(self.head_size):
            raise ValueError(f"head_size={self.head_size!r}: must be a positive int or None")
        if self.head_size is None and self.d_model % self.n_head != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "d_model must be a multiple of n_head (or set head_size)"
            )
        if self.head_dim % 2 != 0:
            where = f"head_size={self.head_size}" if self.head_size is not None else f"d_model / n_head = {self.head_dim}"
            raise ValueError(
                f"{where} is odd: RoPE rotates pairs of dims, "
                "so the head dim (d_model / n_head unless head_size is set) must be even"
            )
        self.rope_scaling = RopeScaling.from_mapping(self.rope_scaling)
        if self.n_head % self.kv_heads != 0:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}: "
                "allowed are the divisors of n_head, or None"
            )

    @property
    def head_dim(self) -> int:
        """`head_size` resolved: the width of one attention head."""
        return self.d_model // self.n_head if self.head_size is None else self.head_size

    @property
    def kv_heads(self) -> int:
        """`n_kv_head` resolved: the number of key/value heads actually built."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        """`ffn_hidden` resolved. Default: 2/3 of the classic 4*d (so SwiGLU's three
        matrices cost about what a 4*d GELU MLP costs), rounded up to `multiple_of`."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return self.multiple_of * math.ceil(int(2 * 4 * self.d_model / 3) / self.multiple_of)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, in fp32 or wider (bf16 loses the mean of squares), cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))  # fp64 stays fp64
        normed = work * torch.rsqrt(work.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(work.dtype)).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE; grouped-query when n_kv_head < n_head."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.kv_heads
        self.head_dim = cfg.head_dim
        # One fused matmul for q, k and v: one large GEMM instead of three small ones.
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """x: [B, T, d], rope: [T, hd/2, 2] for x's positions -> [B, T, d].

        Without a cache x holds positions 0..T-1. With one it holds positions
        cache.length .. cache.length+T-1, and attends to the cached prefix too.
        """
        B, T, _ = x.shape
        q_size = self.n_head * self.head_dim
        kv_size = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope)  # [B, T, H, hd]
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim), rope)  # [B, T, Hkv, hd]
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # [B, Hkv, start + T, hd]
            # A cache kept in a wider dtype than autocast's (fp32 vs bf16) holds the bf16
            # values exactly; SDPA wants one dtype.
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.n_kv_head != self.n_head:
            # Query head h reads kv head h // (n_head / n_kv_head). Explicit repeat instead
            # of SDPA's enable_gqa, which torch 2.4 lacks. Depends only on the config,
            # so torch.compile sees a fixed branch.
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)  # [B, H, S, hd], S = start + T keys
            v = v.repeat_interleave(group, dim=1)
        y = causal_attention(q, k, v, start)  # [B, H, T, hd]
        y = y.transpose(1, 2).reshape(B, T, q_size)  # [B, T, H * hd]
        return self.proj(y)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q: [B, H, T, hd] at positions start..start+T-1; k, v: [B, H, start+T, hd] at 0..start+T-1.

    Query t may see keys 0..start+t. SDPA's `is_causal` aligns the mask top-left (query t
    sees keys 0..t), which is right only when start = 0, so later chunks get an explicit mask.
    `start` is a Python int: the branch is fixed per call and torch.compile guards on it.
    """
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the training call, unchanged
    T, S = q.size(2), k.size(2)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v)  # one new token sees everything before it
    query_pos = torch.arange(start, start + T, device=q.device)
    mask = torch.arange(S, device=q.device) <= query_pos[:, None]  # [T, S], True = may attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        hidden = cfg.ffn_dim
        self.gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, layer)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # RoPE cos/sin, built on first use on the input's device (nothing is computed
        # at construction, so building on the meta device and `to_empty` stay cheap
        # and correct). Non-persistent: derived from the config, never checkpointed.
        self.register_buffer("rope_cache", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """QuEST init. Call again after `to_empty()` when the model was built on meta."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)  # a tied weight is drawn twice; harmless
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # The two projections that write into the residual stream: 2 per layer add up,
        # so shrink them to keep the residual's variance independent of depth (GPT-2).
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for block in self.layers:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=residual_std)
        self.rope_cache = torch.empty(0, device=self.embed.weight.device)

    def _rope(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """[seq_len, head_dim/2, 2] cos/sin, rebuilt only when the cached one is too
        short, on another device, or was cast by `model.to(dtype)`. These checks read
        shapes/devices only, so torch.compile turns them into guards."""
        cache = self.rope_cache
        if cache.size(0) < seq_len or cache.device != device or cache.dtype != torch.float32:
            cache = rope_table(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device, self.cfg.rope_scaling)
            self.rope_cache = cache
        return cache[:seq_len]

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False) -> torch.Tensor:
        """idx: LongTensor [B, T] -> logits [B, T, vocab] (no loss; the trainer computes it).

        Without a cache idx holds positions 0..T-1. With one it holds positions
        cache.length .. cache.length+T-1 (a whole prompt, a chunk of it, or one new token);
        their keys and values are added to the cache and cache.length advances by T.
        last_only: logits of the last position only, [B, 1, vocab], what sampling reads (the
        output head over a whole prompt is a prefill's largest matmul: 512 x 49,152 x 576 in SmolLM2).
        """
        B, T = idx.shape
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
            rope = self._rope(T, idx.device)  # [T, hd/2, 2]
        else:
            start = self._check_cache(cache, B, T)
            # The table for all cache positions, built once per cache size rather than
            # once per decoded token; its rows do not depend on its length.
            rope = self._rope(cache.max_len, idx.device)[start : start + T]  # [T, hd/2, 2]
        x = self.embed(idx)  # [B, T, d]
        for i, block in enumerate(self.layers):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # [B, T, vocab]

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_len` (default max_seq_len)
        tokens. Device and dtype default to the model's: a cache in a narrower dtype than the
        compute would round the keys and values, and cached decoding would drift from recompute."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not _is_positive_int(batch_size):
            raise ValueError(f"batch_size={batch_size!r}: must be a positive int")
        if not _is_positive_int(max_len) or max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len!r}: must be a positive int <= max_seq_len={self.cfg.max_seq_len}")
        weight = self.embed.weight
        return KVCache(
            self.cfg.n_layer,
            batch_size,
            self.cfg.kv_heads,
            max_len,
            self.cfg.head_dim,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
        )

    def _check_cache(self, cache: KVCache, batch_size: int, n_tokens: int) -> int:
        """The first position of the new tokens; a one-line error where they do not fit."""
        start, end = cache.length, cache.length + n_tokens
        if batch_size != cache.batch_size:
            raise ValueError(f"batch size {batch_size} does not match the KV cache's batch_size={cache.batch_size}")
        if end > cache.max_len:
            raise ValueError(f"positions {start}..{end - 1} exceed the KV cache's max_len={cache.max_len}")
        if end > self.cfg.max_seq_len:
            raise ValueError(f"positions {start}..{end - 1} exceed max_seq_len={self.cfg.max_seq_len}")
        return start

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; a tied weight is counted once. `non_embedding=True` drops the
        embedding and lm_head matrices but keeps the norms: the N of the scaling laws."""
        total = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates ties
        if not non_embedding:
            return total
        embedding_weights = {id(self.embed.weight): self.embed.weight, id(self.lm_head.weight): self.lm_head.weight}
        return total - sum(w.numel() for w in embedding_weights.values())


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Analytic TRAINING FLOPs per token (forward + backward), for MFU.

        forward = 2 * P_matmul + 2 * n_layer * a * (seq_len + 1),  a = n_head * head_dim
        train   = 3 * forward            (backward = 2x forward: grads w.r.t. inputs and weights)

    a is the attention width (= d_model unless head_size is set). P_matmul counts every
    weight used in a matmul, lm_head included (also when tied to the embedding; the
    embedding lookup itself is free):
        n_layer * (d * (n_head + 2*n_kv_head) * head_dim + a*d + 3 * d * hidden) + d * vocab.
    Attention: q.k^T and attn.v each cost 2 * a FLOPs per (query, key) pair and layer.
    We count only the pairs a causal mask keeps, i.e. on average (seq_len + 1) / 2 keys per
    query, because causal SDPA kernels (flash / memory-efficient) skip the masked half:
        2 (matmuls) * 2 * a * (seq_len + 1) / 2 = 2 * a * (seq_len + 1) per layer.
    (nanoGPT/PaLM count all seq_len keys, which gives ~2x this attention term.)
    Norms, RoPE, softmax and the SwiGLU product are elementwise and left out.
    """
    if not _is_positive_int(seq_len):
        raise ValueError(f"seq_len={seq_len!r}: must be a positive int")
    d, hidden, a = cfg.d_model, cfg.ffn_dim, cfg.n_head * cfg.head_dim
    per_layer = d * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim + a * d + 3 * d * hidden
    matmul_params = cfg.n_layer * per_layer + d * cfg.vocab_size
    attention = 2 * cfg.n_layer * a * (seq_len + 1)
    return 3.0 * (2 * matmul_params + attention)
