"""Orthonormal block Walsh-Hadamard transform along the last dimension.

QuEST rotates with a dense d x d block-diagonal matmul; we use the O(n log n) butterfly
instead (and fast-hadamard-transform's CUDA kernel when it is installed). All paths compute
the same matrix: the Sylvester-ordered H_b / sqrt(b), which is symmetric and its own
inverse, so x @ W.T == (x H) @ (W H).T for a linear layer.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

_FHT_MAX_BLOCK = 32768  # the CUDA extension's largest supported dim


def check_block(dim: int, block: int) -> None:
    """The one check of a Hadamard block against the dim it rotates."""
    if block < 2 or block & (block - 1):
        raise ValueError(
            f"hadamard block={block} is not allowed; use a power of two >= 2 "
            f"(hadamard_block='full' needs a power-of-two last dim, got {dim})"
        )
    if dim % block:
        raise ValueError(
            f"last dim {dim} is not divisible by the Hadamard block {block}; choose hadamard_block dividing it "
            "(or 'full' for a power-of-two dim)"
        )


# Looked up once at import (no GPU work): a cached-function call inside the forward would
# break torch.compile graphs.
_FHT_AVAILABLE = importlib.util.find_spec("fast_hadamard_transform") is not None


def _butterfly(x: torch.Tensor, block: int) -> torch.Tensor:
    # Stage h pairs element i with i + h inside runs of 2h; after log2(block) stages the
    # result is x @ H_block in Sylvester (natural) order, without the 1/sqrt(block).
    rows = x.reshape(-1, block)
    h = 1
    while h < block:
        pairs = rows.view(-1, block // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        rows = torch.stack((a + b, a - b), dim=2).view(-1, block)
        h *= 2
    return rows.view(x.shape)


def hadamard_transform(x: torch.Tensor, block: int | str = 128) -> torch.Tensor:
    """x @ blockdiag(H_block / sqrt(block)) along the last dim; differentiable.

    block: a power of two dividing x.shape[-1], or "full" (the whole last dim).
    Half-precision inputs are transformed in fp32 and cast back (the butterfly's
    log2(block) additions would otherwise round at every stage).
    """
    dim = x.shape[-1]
    block = dim if block == "full" else int(block)
    check_block(dim, block)
    scale = 1.0 / math.sqrt(block)
    if x.is_cuda and block <= _FHT_MAX_BLOCK and _FHT_AVAILABLE and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        from fast_hadamard_transform import hadamard_transform as fht

        return fht(x.reshape(-1, block), scale=scale).view(x.shape)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return (_butterfly(work, block) * scale).to(x.dtype)


@functools.lru_cache(maxsize=32)
def _sylvester_cpu(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(size)


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Explicit orthonormal Sylvester matrix H_size / sqrt(size) (built lazily, cached on CPU)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"hadamard size={size} is not allowed; use a power of two")
    return _sylvester_cpu(size).to(device=device, dtype=dtype)
