"""Global-batch sampling: the data order depends on the global batch, never on the world size.

Global micro-batch i (i = 0, 1, ...) is the G windows `perm_p[j*G:(j+1)*G]`,
where p = i // B, j = i % B, B = num_windows // G batches per pass and perm_p
a permutation of all windows drawn from the seed (seed, p): each pass is
sampled without replacement and reshuffled, the last num_windows % G windows
of a pass are skipped. Rank r of W takes the contiguous slice
`[r*G/W, (r+1)*G/W)` of every global batch, so 2 ranks with G/2 sequences
each see exactly the sequences that 1 rank with G sees, and resuming at
micro-batch i needs only i.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


def _check_sharding(global_batch: int, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(f"data.batch_size={global_batch} must be a positive multiple of the world size {world_size}")


class GlobalBatchSampler(Sampler[list[int]]):
    """Endless stream of this rank's window indices, starting at global micro-batch `start_batch`.

    It has no `__len__` on purpose: the stream never ends, so Lightning runs one
    epoch until `max_steps`, and never restarts it from the beginning.
    """

    def __init__(self, num_windows: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
        _check_sharding(global_batch, rank, world_size)
        if num_windows < global_batch:
            raise ValueError(f"only {num_windows} training windows for data.batch_size={global_batch}; need more data or a smaller batch")
        if start_batch < 0:
            raise ValueError(f"start_batch={start_batch} must be >= 0")
        self.num_windows = num_windows
        self.global_batch_size = global_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.batches_per_pass = num_windows // global_batch
        self._perm_pass = -1
        self._perm = np.empty(0, dtype=np.int64)

    def global_batch(self, i: int) -> np.ndarray:
        """Window indices of global micro-batch i (all ranks)."""
        p, j = divmod(i, self.batches_per_pass)
        if p != self._perm_pass:
            self._perm = np.random.default_rng([self.seed, p]).permutation(self.num_windows)
            self._perm_pass = p
        return self._perm[j * self.global_batch_size : (j + 1) * self.global_batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        i = self.start_batch
        while True:
            yield self.global_batch(i)[lo:hi].tolist()
            i += 1


class FixedBatchSampler(Sampler[list[int]]):
    """The first num_batches * G windows in order, sharded across ranks the same way (validation)."""

    def __init__(self, num_batches: int, global_batch: int, rank: int = 0, world_size: int = 1):
        _check_sharding(global_batch, rank, world_size)
        self.num_batches = num_batches
        self.global_batch_size = global_batch
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.world_size
        for k in range(self.num_batches):
            start = k * self.global_batch_size + self.rank * per_rank
            yield list(range(start, start + per_rank))
