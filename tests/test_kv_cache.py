"""Incremental decoding with a KV cache gives the full forward's logits (CPU, fast).

The reference is always the plain forward on the whole sequence: logits at position t
depend only on tokens 0..t, so prefill + decode must reproduce them position by position.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qat.models.llama import Llama, LlamaConfig
from qat.models.kv_cache import KVCache

SEQ_LEN = 24
CONFIGS = {
    "mha": dict(),
    "gqa2": dict(n_kv_head=2),
    "gqa1": dict(n_kv_head=1),
    "tied": dict(tie_embeddings=True, n_kv_head=2),
}


def tiny_model(dtype: torch.dtype = torch.float64, **overrides) -> Llama:
    kwargs = dict(vocab_size=64, n_layer=2, d_model=64, n_head=4, multiple_of=32, max_seq_len=32)
    torch.manual_seed(0)
    # Larger than the N(0, 0.02) init so attention is far from uniform and a wrong
    # position, mask or kv head shows up in the logits.
    model = Llama(LlamaConfig(**{**kwargs, **overrides}, init_std=0.2)).to(dtype)
    return model.eval()


def random_tokens(batch_size: int = 3, seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_in_chunks(model: Llama, idx: torch.Tensor, chunks: list[int], cache: KVCache | None = None) -> torch.Tensor:
    """Logits for idx fed through a cache `chunks[0]` tokens, then `chunks[1]`, ... : [B, T, vocab]."""
    assert sum(chunks) == idx.size(1)
    cache = model.new_kv_cache(idx.size(0), 32) if cache is None else cache
    out, start = [], 0
    for n in chunks:
        assert cache.length == start
        out.append(model(idx[:, start : start + n], cache))
        start += n
    assert cache.length == idx.size(1)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_prefill_equals_full_forward(name):
    model = tiny_model(**CONFIGS[name])
    idx = random_tokens()
    # A prefill from an empty cache makes the training forward's SDPA call (is_causal=True on
    # the same q, k, v values), so it is exact, not merely close.
    assert torch.equal(decode_in_chunks(model, idx, [SEQ_LEN]), model(idx))


# float64: only summation order differs (SDPA over a prefix vs the whole sequence, GEMMs
# of other shapes), ~1e-16 relative per op, far below 1e-10. float32: the same reordering
# costs ~1e-7 relative per op, compounded over 2 layers on logits of size ~1, so 1e-5.
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", CONFIGS)
def test_prefix_then_token_by_token_matches_full_forward(name, dtype, atol):
    model = tiny_model(dtype, **CONFIGS[name])
    idx = random_tokens()
    prefix = 5
    cached = decode_in_chunks(model, idx, [prefix] + [1] * (SEQ_LEN - prefix))
    torch.testing.assert_close(cached, model(idx).detach(), atol=atol, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_chunked_prefill_matches_full_forward(name):
    model = tiny_model(**CONFIGS[name])
    idx = random_tokens()
    cached = decode_in_chunks(model, idx, [3, 1, 6, 2, 7, 5])  # the masked multi-token chunks
    torch.testing.assert_close(cached, model(idx).detach(), atol=1e-10, rtol=0)


def test_batch_rows_are_decoded_independently():
    """A batch of 3 through one cache equals each sequence decoded alone."""
    model = tiny_model(n_kv_head=2)
    idx = random_tokens(batch_size=3)
    chunks = [4, 1, 1, 8, 1, 9]
    batched = decode_in_chunks(model, idx, chunks)
    for b in range(3):
        alone = decode_in_chunks(model, idx[b : b + 1], chunks)
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-10, rtol=0)


def test_cache_stores_kv_heads_only_in_the_model_dtype():
    model = tiny_model(n_kv_head=1)
    cache = model.new_kv_cache(2, 16)
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[0].shape == (2, 1, 16, 16)  # [B, n_kv_head, max_len, head_dim]
    assert cache.k[0].dtype == torch.float64 and cache.length == 0
    assert model.new_kv_cache(1).max_len == 32  # defaults to max_seq_len
    assert model.new_kv_cache(1, 8, dtype=torch.float32).v[1].dtype == torch.float32


def test_reset_and_a_fresh_cache_reproduce_the_results():
    model = tiny_model(n_kv_head=2)
    idx, other = random_tokens(seed=1), random_tokens(seed=2)
    chunks = [5, 1, 1, 1, 16]
    cache = model.new_kv_cache(3, 32)
    first = decode_in_chunks(model, idx, chunks, cache)
    cache.reset()
    decode_in_chunks(model, other, [SEQ_LEN], cache)  # leaves stale keys of `other` behind
    cache.reset()
    # Shorter than `other`: positions past the new length still hold other's keys, never read.
    again = decode_in_chunks(model, idx[:, :8], [5, 1, 1, 1], cache)
    assert torch.equal(again, first[:, :8])
    assert torch.equal(decode_in_chunks(model, idx, chunks), first)


def test_overflow_and_batch_mismatch_errors_are_one_line_and_name_the_value():
    model = tiny_model()
    cache = model.new_kv_cache(2, 10)
    with torch.no_grad():
        model(random_tokens(2, 8), cache)
    errors = []
    with pytest.raises(ValueError, match=r"positions 8\.\.10 exceed the KV cache's max_len=10") as e:
        model(random_tokens(2, 3), cache)
    errors.append(e)
    assert cache.length == 8  # a rejected call leaves the cache as it was
    with pytest.raises(ValueError, match=r"batch size 3 does not match the KV cache's batch_size=2") as e:
        model(random_tokens(3, 1), cache)
    errors.append(e)
    # A hand-built cache longer than the model allows: RoPE positions past max_seq_len=32.
    long_cache = KVCache(2, 1, 4, 40, 16, dtype=torch.float64)
    long_cache.length = 30
    with pytest.raises(ValueError, match=r"positions 30\.\.32 exceed max_seq_len=32") as e:
        model(random_tokens(1, 3), long_cache)
    errors.append(e)
    with pytest.raises(ValueError, match=r"max_len=40: .*max_seq_len=32") as e:
        model.new_kv_cache(1, 40)
    errors.append(e)
    with pytest.raises(ValueError, match=r"batch_size=0") as e:
        model.new_kv_cache(0, 8)
    errors.append(e)
    assert all("\n" not in str(e.value) for e in errors)


class RowRoundedLinear(nn.Linear):
    """Rounds each input row (one token) to a 16-level grid scaled by that row's absmax: a
    stand-in for a per-token activation quantizer. `per_tensor` scales by the whole input's
    absmax instead, which mixes tokens and so breaks cache == recompute."""

    per_tensor = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amax = x.abs().amax() if self.per_tensor else x.abs().amax(dim=-1, keepdim=True)  # [..., 1]
        scale = amax / 7
        return F.linear(torch.round(x / scale) * scale, self.weight)


@pytest.mark.parametrize("name", ["gqa2", "tied"])
def test_row_wise_nonlinear_linears_keep_cache_equal_to_recompute(name, monkeypatch):
    model = tiny_model(**CONFIGS[name])
    swapped = [m for m in model.modules() if type(m) is nn.Linear]
    for m in swapped:
        m.__class__ = RowRoundedLinear  # keeps the (possibly tied) weight
    assert len(swapped) == 2 * 5 + 1
    idx = random_tokens()
    chunks = [5, 1, 1, 4, 1, 12]
    full = model(idx).detach()
    torch.testing.assert_close(decode_in_chunks(model, idx, chunks), full, atol=1e-10, rtol=0)
    # The check has teeth: a quantizer that mixes token rows gives other values per chunk.
    monkeypatch.setattr(RowRoundedLinear, "per_tensor", True)
    diff = (decode_in_chunks(model, idx, chunks) - model(idx).detach()).abs().max()
    assert diff > 1e-3


def test_bf16_autocast_with_an_fp32_cache():
    model = tiny_model(torch.float32, n_kv_head=2)
    idx = random_tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx).detach()
        cached = decode_in_chunks(model, idx, [6] + [1] * (SEQ_LEN - 6))
    assert cached.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: reordered sums differ by a few bf16 ulps of logits ~1.
    torch.testing.assert_close(cached.float(), full.float(), atol=0.1, rtol=0.05)


@pytest.mark.slow  # subprocesses or compilation: out of the quick loop, in CI's suite
def test_decode_step_compiles_without_graph_breaks():
    model = tiny_model(torch.float32, n_kv_head=2)
    idx = random_tokens(seq_len=9)
    chunks = [4] + [1] * 5
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    eager = decode_in_chunks(model, idx, chunks)
    compiled_out = decode_in_chunks(compiled, idx, chunks, model.new_kv_cache(3, 32))
    torch.testing.assert_close(compiled_out, eager, atol=1e-5, rtol=0)
