"""Host-side plan of one fused quantization: the kernel scalars, the tiling, the Hadamard factors.

Everything the Triton kernels need but should not recompute per element is derived once, on
the host: the tiling and Hadamard factors here, the per-quantizer constants (grid centre,
c(bits), trust radius) by the caller, who passes them as a `QuantScalars`.

Rotation by a Hadamard block b along K is done with tensor-core matmuls against ±1
matrices (exact in every dtype; the 1/sqrt(b) is applied afterwards in fp32):

- b <= 128: one 128 x 128 matrix, blockdiag(H_b, ..., H_b); a K tile of 128·j columns is
  viewed as [rows·j, 128] and multiplied by it. Blocks below 16 (which `tl.dot` cannot
  take as a dimension) need no special case: the zeros off the diagonal add exactly.
- 128 < b <= MAX_FUSED_BLOCK: the Sylvester identity H_b = H_outer ⊗ H_inner with both
  factors >= 16 (e.g. 4096 = 64 x 64): multiply by H_inner along the inner index, then by
  H_outer along the outer one (a transpose in registers). The tile is one whole block.
- b > MAX_FUSED_BLOCK: the caller rotates beforehand and asks for no rotation (a tile of b
  fp32 values no longer fits in registers).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

ESTIMATOR_CODES = {"trust": 0, "ste": 1, "clip": 2}
MAX_FUSED_BLOCK = 8192  # one block per tile: 8192 fp32 values per program at most
SMALL_BLOCK_TILE = 128  # the blockdiag(H_b) matrix used for every b <= 128
# Elements per tile for blocks <= 128 and no rotation: 8192 gives the tl.dot 64 rows, which
# Triton turns into Hopper wgmma with the ±1 matrix in shared memory (at 32 rows it falls
# back to mma.sync holding the matrix in registers: 255 registers and spills on sm_90).
TILE_ELEMENTS = 8192
MAX_TILE_K = 1024  # columns per tile when a row spans several tiles
NUM_WARPS = 8  # two warpgroups: 32 fp32 values of an 8192-element tile per thread


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class QuantScalars:
    """Per-quantizer constants passed to the kernel as scalars (fp32 there). The caller derives
    them from its grid once (kernels know nothing of configs or grids)."""

    scale_factor: float  # c(bits): s = c * rms
    center: float  # grid centre: codes run over 0 .. 2 * center
    trust: float  # trust radius in RMS units (trust estimator)
    clip: float  # clip_scale (clip estimator)
    estimator: str

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATOR_CODES:
            raise ValueError(f"estimator={self.estimator!r} is not fused; choose one of {', '.join(ESTIMATOR_CODES)}")


@dataclass(frozen=True)
class Tiling:
    """How a [rows, K] tensor is cut into [block_m, tile_k] tiles, and how each tile is rotated.

    block: the Hadamard block (0 = none). inner/outer: the Kronecker factors of the tile's
    rotation (outer = 1 for a single matmul by the inner matrix).
    """

    block: int
    block_m: int
    tile_k: int
    inner: int
    outer: int
    num_tiles: int
    num_warps: int

    @property
    def rotate(self) -> bool:
        return self.block > 0


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def kronecker_split(block: int) -> tuple[int, int]:
    """(outer, inner) with outer * inner = block, both >= 16, inner >= outer (block >= 256)."""
    inner = 1 << math.ceil(math.log2(block) / 2)
    return block // inner, inner


@functools.cache
def tiling_for(dim: int, block: int) -> Tiling:
    """Tile a row of `dim` values rotated by Hadamard blocks of `block` (0 = none)."""
    if block > MAX_FUSED_BLOCK:
        raise ValueError(f"Hadamard block {block} exceeds the fused kernel's {MAX_FUSED_BLOCK}; rotate beforehand")
    if block > SMALL_BLOCK_TILE:
        outer, inner = kronecker_split(block)
        tile_k = block
    else:
        # Short tiles for long rows keep a program's rows small enough (block_m * K values)
        # to stay in L2 between the two sweeps over a row (see hadamard_quant.py). tl.dot
        # needs every dimension >= 16; the 128-wide matrix needs tiles of >= 128 columns.
        floor_k = SMALL_BLOCK_TILE if block else 16
        tile_k = max(floor_k, min(MAX_TILE_K, _next_pow2(dim)))
        outer, inner = 1, SMALL_BLOCK_TILE
    block_m = max(1, TILE_ELEMENTS // tile_k)
    return Tiling(
        block=block,
        block_m=block_m,
        tile_k=tile_k,
        inner=inner,
        outer=outer,
        num_tiles=-(-dim // tile_k),
        num_warps=NUM_WARPS,
    )
