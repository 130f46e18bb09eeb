"""Pack a flat token stream into fixed-length training windows.

Window i is `tokens[i*T : i*T + T + 1]` with T = seq_len: the input is its
first T ids and the target the last T (shifted by one). Consecutive windows
share one boundary token, so inputs never overlap and every token of the
stream except the first is a target exactly once. Documents are not aligned to
windows: a window may start mid-document, and the separator id between
documents is an ordinary target.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from qat.data.token_cache import TokenCache


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many full windows of seq_len + 1 tokens (stride seq_len) the stream holds."""
    return max(0, (num_tokens - 1) // seq_len)


class TokenWindows(Dataset):
    """Map-style dataset of (x, y) LongTensors [seq_len] over a token cache."""

    def __init__(self, cache: TokenCache, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2")
        self.cache = cache
        self.seq_len = seq_len
        self._tokens: np.memmap | None = None  # opened lazily in each (worker) process

    def __len__(self) -> int:
        return num_windows(self.cache.num_tokens, self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        if self._tokens is None:
            self._tokens = self.cache.tokens()
        start = i * self.seq_len
        window = torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        # Pickling a memmap would copy the whole array into each DataLoader worker.
        return {**self.__dict__, "_tokens": None}
