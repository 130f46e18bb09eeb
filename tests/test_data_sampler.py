"""Packing into windows and global-batch sampling across ranks, passes and resumes."""
import numpy as np
import pytest
import torch

from qat.data.sampler import FixedBatchSampler, GlobalBatchSampler
from qat.data.token_cache import load_or_build
from qat.data.tokenizer import ByteTokenizer
from qat.data.windows import TokenWindows


class Ids:
    """Tokenizer whose documents are lists of ids written as text, for exact streams."""

    vocab_size, eos_id = 1000, 999

    def encode_batch(self, texts):
        return [[int(w) for w in t.split()] for t in texts]

    def identity(self):
        return "ids"


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_windows_shift_by_one_and_tile_the_stream(tmp_path):
    # One document 0..99 -> stream 0..99, 999; seq_len 8 -> windows start at 0, 8, ..., 88.
    cache = load_or_build(str(tmp_path), "t", {"k": 1}, [" ".join(map(str, range(100)))], Ids())
    windows = TokenWindows(cache, seq_len=8)
    assert len(windows) == (101 - 1) // 8 == 12
    stream = np.append(np.arange(100), 999)
    for i in range(len(windows)):
        x, y = windows[i]
        assert x.dtype == torch.int64 and x.shape == (8,)
        np.testing.assert_array_equal(x.numpy(), stream[8 * i : 8 * i + 8])
        np.testing.assert_array_equal(y.numpy(), stream[8 * i + 1 : 8 * i + 9])
    # Every stream token except the first is a target exactly once (up to the ragged tail).
    targets = np.concatenate([windows[i][1].numpy() for i in range(len(windows))])
    np.testing.assert_array_equal(targets, stream[1 : 1 + 8 * 12])
    with pytest.raises(IndexError):
        windows[12]


def test_separators_sit_between_documents(tmp_path):
    docs = ["farm: the cow runs.", "sea: a crab waits."]
    cache = load_or_build(str(tmp_path), "t", {"k": 2}, docs * 20, ByteTokenizer())
    x, y = TokenWindows(cache, seq_len=32)[3]
    assert torch.equal(x[1:], y[:-1])
    stream = cache.tokens()
    eos_positions = np.flatnonzero(stream == 256)
    lengths = np.diff(np.concatenate([[-1], eos_positions])) - 1
    np.testing.assert_array_equal(lengths, [len(d) for d in docs] * 20)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ranks_together_see_the_single_rank_batches(world_size):
    n, g, seed = 103, 8, 5  # 12 batches per pass; 40 steps cross three pass boundaries
    single = _take(GlobalBatchSampler(n, g, seed), 40)
    per_rank = [_take(GlobalBatchSampler(n, g, seed, rank=r, world_size=world_size), 40) for r in range(world_size)]
    for step in range(40):
        assert sum((rank[step] for rank in per_rank), []) == single[step]
        assert all(len(rank[step]) == g // world_size for rank in per_rank)


def test_each_pass_is_a_fresh_permutation_without_replacement():
    n, g = 103, 8
    batches = _take(GlobalBatchSampler(n, g, seed=0), 36)  # three passes of 12 batches
    passes = [sum(batches[12 * p : 12 * p + 12], []) for p in range(3)]
    for seen in passes:
        assert len(seen) == len(set(seen)) == 96 and max(seen) < n
    assert passes[0] != passes[1] != passes[2]
    assert _take(GlobalBatchSampler(n, g, seed=1), 12) != batches[:12]


def test_resume_starts_at_the_given_micro_batch():
    full = _take(GlobalBatchSampler(103, 8, seed=3, rank=1, world_size=2), 30)
    resumed = _take(GlobalBatchSampler(103, 8, seed=3, rank=1, world_size=2, start_batch=17), 13)
    assert resumed == full[17:]


def test_fixed_batches_are_the_leading_windows_sharded():
    for k, batch in enumerate(FixedBatchSampler(3, 8)):
        assert batch == list(range(8 * k, 8 * k + 8))
    shards = [list(FixedBatchSampler(3, 8, rank=r, world_size=4)) for r in range(4)]
    assert [sum((s[k] for s in shards), []) for k in range(3)] == list(FixedBatchSampler(3, 8))
    assert len(FixedBatchSampler(3, 8)) == 3


def test_bad_sharding_is_rejected():
    with pytest.raises(ValueError, match="data.batch_size=6 must be a positive multiple of the world size 4"):
        GlobalBatchSampler(100, 6, seed=0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank=2"):
        FixedBatchSampler(1, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="only 5 training windows"):
        GlobalBatchSampler(5, 8, seed=0)
