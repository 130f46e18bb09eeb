"""Orthonormal block Hadamard transform along the last dimension.

QuEST rotates with a dense d x d block-diagonal matmul; we use the O(n log n) butterfly
instead (and fast-hadamard-transform's CUDA kernel when it is installed). A power-of-two
block b is the Sylvester-ordered H_b / sqrt(b), symmetric and its own inverse.

Real models' dims are often not powers of two (576, 1536, 11008, 14336): a block
n = m * p (p a power of two) is H_n = H_m ⊗ H_p with H_m a Paley construction
(hadamard_orders.py). Along the last dim viewed as [..., n / block, m, p], the butterfly
runs along p and a dense m x m matmul (the cached H_m / sqrt(m)) along m; the smallest m
is chosen, so the extra cost is m multiply-adds per element (m = 344 for 11008). H_m is not
symmetric in general (Paley I), so H^-1 = H^T, not H: a linear layer only needs H
orthogonal, x @ W.T == (x H) @ (W H).T, and `inverse=True` applies H^T to rotate back.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

from qat.quant.hadamard_orders import dense_hadamard, hadamard_factorization, hadamard_kronecker, largest_constructible_block

_FHT_MAX_BLOCK = 32768  # the CUDA extension's largest supported dim
# In a block m * p (m > 1), H_p up to this order is one dense GEMM rather than log2(p) butterfly
# stages of small ops: on 2 CPU cores 5-20x faster for one decoded token (a row of 576 or 1536)
# and 3-12x for 1024 rows (measured 2026-12-06); beyond it the GEMM's p multiply-adds per
# element lose to the butterfly's log2(p) additions.
DENSE_POWER_MAX = 256


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# The forward calls these two under torch.compile: each is evaluated once at trace time and
# its result baked into the graph as a constant (a cached-function call would break it).
@torch.compiler.assume_constant_result
def _factorization(block: int) -> tuple[int, int] | None:
    return hadamard_factorization(block)


@torch.compiler.assume_constant_result
def _dense_factor(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _dense_factor_cached(m, dtype, device)


@functools.lru_cache(maxsize=32)
def _dense_factor_cached(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # H_m / sqrt(m) (Paley or Sylvester), scaled in float64 and rounded once to the compute
    # dtype. Built outside inference mode: an inference tensor in the cache could never be
    # saved for backward.
    with torch.inference_mode(False):
        return (torch.tensor(dense_hadamard(m)) / math.sqrt(m)).to(device=device, dtype=dtype)


def check_block(dim: int, block: int) -> None:
    """The one check of a Hadamard block against the dim it rotates: an int >= 2 dividing
    dim with a known construction (hadamard_orders.py); else one line naming what works."""
    ok = isinstance(block, int) and not isinstance(block, bool) and block >= 2 and dim % block == 0
    if ok and (_is_power_of_two(block) or _factorization(block) is not None):
        return
    best = largest_constructible_block(dim)
    works = f"the largest block that works is {best}" if best >= 2 else "no block works (an odd dim has no Hadamard block)"
    if not (isinstance(block, int) and not isinstance(block, bool) and block >= 2):
        raise ValueError(f"hadamard block={block!r} is not allowed for last dim {dim}; use an int >= 2: {works}")
    if dim % block:
        raise ValueError(f"last dim {dim} is not divisible by the Hadamard block {block}; {works}")
    raise ValueError(f"last dim {dim} has no Hadamard construction for block {block}; {works}")


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


def _fht_applies(x: torch.Tensor, block: int) -> bool:
    return x.is_cuda and block <= _FHT_MAX_BLOCK and _FHT_AVAILABLE and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _sylvester_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ blockdiag(H_block / sqrt(block)), block a power of two, in x's dtype."""
    scale = 1.0 / math.sqrt(block)
    if _fht_applies(x, block):
        from fast_hadamard_transform import hadamard_transform as fht

        return fht(x.reshape(-1, block), scale=scale).view(x.shape)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return (_butterfly(work, block) * scale).to(x.dtype)


def hadamard_transform(x: torch.Tensor, block: int | str = 128, *, inverse: bool = False) -> torch.Tensor:
    """x @ blockdiag(H_block / sqrt(block)) along the last dim (x @ its transpose with
    inverse=True); differentiable.

    block: an int dividing x.shape[-1] with a Hadamard construction (a power of two, or
    m * 2^k with m a Paley order, see hadamard_orders.py), or "full" (the whole last dim).
    Half-precision inputs are transformed in fp32 and cast back (the butterfly's
    log2(block) additions would otherwise round at every stage).
    """
    dim = x.shape[-1]
    block = dim if block == "full" else int(block)
    check_block(dim, block)
    if _is_power_of_two(block):  # symmetric: inverse is the same matrix
        return _sylvester_transform(x, block)
    m, p = _factorization(block)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    # A row x = vec(X), X [m, p] row-major: x (H_m ⊗ H_p) = vec(H_m^T X H_p) (scaled).
    rows = work.reshape(-1, m, p)
    if p > 1:  # H_p along p, on the fp32 / fp64 values
        if p <= DENSE_POWER_MAX and not _fht_applies(rows, p):
            rows = rows @ _dense_factor(p, work.dtype, work.device)  # Sylvester: symmetric
        else:
            rows = _sylvester_transform(rows, p)
    h = _dense_factor(m, work.dtype, work.device)  # H_m / sqrt(m)
    rows = torch.matmul(h if inverse else h.T, rows)  # H_m^T X (H_m X to rotate back)
    return rows.reshape(x.shape).to(x.dtype)


@functools.lru_cache(maxsize=32)
def _sylvester_cpu(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(size)


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Explicit orthonormal H_size / sqrt(size), the matrix `hadamard_transform` applies:
    Sylvester for a power of two (built lazily, cached on CPU), else H_m ⊗ H_p (a new
    tensor from the cached factors: size^2 values, 1.6 GB in float64 for 14336, not kept)."""
    if isinstance(size, int) and _is_power_of_two(size):
        return _sylvester_cpu(size).to(device=device, dtype=dtype)
    if not isinstance(size, int) or hadamard_factorization(size) is None:
        raise ValueError(f"hadamard size={size!r} has no construction; use a power of two or m * 2^k with m a Paley order (see qat.quant.hadamard_orders)")
    return (torch.from_numpy(hadamard_kronecker(size)) / math.sqrt(size)).to(device=device, dtype=dtype)
