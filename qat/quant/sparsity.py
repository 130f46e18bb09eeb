"""2:4 structured sparsity: keep the 2 largest magnitudes in every 4 consecutive values."""

from __future__ import annotations

import torch


def two_of_four_mask(x: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the kept entries along the last dim (which must be divisible by 4).

    Ties break towards the lower index (topk's order), so the mask always keeps exactly 2.
    """
    if x.shape[-1] % 4:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by 4, which sparsity='2:4' needs")
    groups = x.detach().abs().reshape(*x.shape[:-1], -1, 4)
    top = groups.topk(2, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(x.shape)
