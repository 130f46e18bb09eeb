"""Host-side plan of the low-bit GEMMs: which layers they serve, and how they are tiled.

Two kernels (lowbit_gemm.py) run a packed layer's forward:

- integer: int8 activation codes x packed weight codes, int8 `tl.dot` with int32
  accumulation, both scales in the epilogue (uniform grids on both sides);
- dequantize: a 16-bit (or fake-quantized) activation x packed weight codes decoded to
  floats in registers (any grid: uniform, or a level table such as gaussian / fp4; dense or
  2:4), a bf16/fp16 (fp32 in the interpreter) `tl.dot` with fp32 accumulation.

Both are one tiled GEMM over [BLOCK_M, BLOCK_N] output tiles with an optional split of K:
prefill (M > DECODE_MAX_M) uses large tiles and no split; decode (M <= 16, one M block)
splits K so that every SM streams its own slice of the weight, which is then read exactly
once. Split-K partial sums go to an fp32 buffer and are added in a fixed order on the host
(deterministic, unlike atomics: the same tokens on every run).

Integer sums are taken per *segment*: a scale group (the finer of the two sides' groups), or
for per-row scales the part of K one split covers. A segment is a multiple of BLOCK_K, so a
tile never straddles two scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qat.kernels.plan import interpreting

TERNARY_BITS = 1.58  # the bits spelling of the base-3 packing (5 codes per byte)
DECODE_MAX_M = 16  # up to this many rows, one M block and split-K (a GEMV-like pass over W)
INT_MIN_BLOCK_K = 32  # int8 MMA consumes K in steps of 32
FLOAT_MIN_BLOCK_K = 16
# An integer segment sums K_seg products |q_a q_w| <= 255 * 255 (8-bit "int": q = 2u + 1) in
# int32: 255**2 * 32768 < 2**31. The u-products (|u| <= 128) are smaller still.
MAX_INT_SEGMENT = 32768
KERNEL_DTYPES = ("float32", "bfloat16", "float16")
# Ternary decoding without integer division (slow on GPUs): for a byte x <= 242,
# floor(x / 3**d) == (x * TERNARY_RECIPROCALS[d]) >> 16, and floor(q / 3) == (q * 171) >> 9
# (both checked for every byte in the tests).
TERNARY_RECIPROCALS = (65536, 21846, 7282, 2428, 810)


@dataclass(frozen=True)
class GemmTiles:
    """One launch's tiling. split_k: how many programs share one output tile's K range."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8  # output tiles visited in groups of group_m rows of tiles (L2 reuse of W)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} is not allowed; use a power of two")
        if self.block_k < FLOAT_MIN_BLOCK_K or self.split_k < 1:
            raise ValueError(f"block_k={self.block_k}, split_k={self.split_k} are not allowed; use block_k >= 16, split_k >= 1")


def is_ternary(bits: float) -> bool:
    return math.isclose(bits, TERNARY_BITS, abs_tol=5e-3)


def row_bytes(n_codes: int, bits: float) -> int:
    """Bytes of one packed row (the packing format: ceil(K*b/8), or ceil(K/5) ternary)."""
    return -(-n_codes // 5) if is_ternary(bits) else -(-n_codes * int(bits) // 8)


def kernel_bits(bits: float) -> tuple[int, bool]:
    """(BITS, TERNARY) constexprs: BITS is the code width (2 for ternary, unused there)."""
    if is_ternary(bits):
        return 2, True
    if not (float(bits).is_integer() and 1 <= bits <= 8):
        raise ValueError(f"bits={bits!r} is not allowed; use 1..8 or 1.58 (ternary)")
    return int(bits), False


def _block_k_for(segment: int, default: int, floor: int) -> int | None:
    """The largest power of two <= default dividing a scale group (None: none >= floor)."""
    bk = default
    while bk >= floor and segment % bk:
        bk //= 2
    return bk if bk >= floor else None


def lowbit_unsupported_reason(*, integer: bool, k: int, weight_group: int, input_group: int, dtype: str) -> str | None:
    """None when the low-bit kernels run this layer, else why not (one phrase). Asked once per
    layer, when a packed model is loaded. Groups are in columns (k for one scale per row)."""
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} (supported: {', '.join(KERNEL_DTYPES)})"
    floor = INT_MIN_BLOCK_K if integer else FLOAT_MIN_BLOCK_K
    groups = [g for g in ((weight_group, input_group) if integer else (weight_group,)) if g < k]
    segment = math.gcd(*groups) if groups else k
    if groups and _block_k_for(segment, 128, floor) is None:
        return f"scale group {segment} (the kernels need groups that are multiples of {floor})"
    if integer and segment > MAX_INT_SEGMENT:
        return f"{segment} columns per scale (the int32 accumulator holds at most {MAX_INT_SEGMENT})"
    return None


def gemm_tiles(*, integer: bool, m: int, n: int, k: int, segment: int, sms: int) -> GemmTiles:
    """The tiling of one call. segment: columns per scale group (k for per-row scales)."""
    floor = INT_MIN_BLOCK_K if integer else FLOAT_MIN_BLOCK_K
    grouped = segment < k
    if interpreting():
        # The interpreter pays per operation, not per element: few, large tiles (tests pass
        # small ones explicitly to exercise the tails).
        bk = _block_k_for(segment, 128, floor) if grouped else 128
        return GemmTiles(min(64, max(16, 1 << (m - 1).bit_length())), 128, bk, num_warps=1)
    if m <= DECODE_MAX_M:
        # Decode: one M block; split K until ~2 programs per SM each stream their own slice.
        # 8 warps: a [K, 64] weight tile decoded in registers is 32-64 values a thread, and
        # the byte gathers of 3/5/6/7-bit and ternary codes (which cp.async cannot stage)
        # are held in registers across the pipeline's stages (qat.kernels.aot: no spills).
        bk_default = 256 if integer else 128
        bk = _block_k_for(segment, bk_default, floor) if grouped else bk_default
        tiles_mn = -(-n // 64)
        split = max(1, min((2 * sms) // tiles_mn, -(-k // (4 * bk))))
        return GemmTiles(16, 64, bk, split_k=split, num_warps=8, num_stages=4)
    # Prefill: 128 x 128 tiles on two warpgroups (wgmma). K tiles of 64: with 128 the int8
    # GEMM's decode-and-row-sum registers spill (8-bit "int" grid) on sm_90.
    bk = _block_k_for(segment, 64, floor) if grouped else 64
    block_m = 64 if m <= 64 else 128
    return GemmTiles(block_m, 128, bk, num_warps=8 if block_m == 128 else 4, num_stages=3)


def segment_plan(k: int, group: int, tiles: GemmTiles) -> tuple[int, int, int]:
    """(segment length, segments per split, splits actually used) for a K of `k` columns with
    scale groups of `group` columns (k: per row). A grouped K splits along its groups; a
    per-row K into split_k equal multiples of block_k."""
    if group < k:
        if group % tiles.block_k:
            raise ValueError(f"block_k={tiles.block_k} does not divide the scale group {group}; use a divisor")
        seg = group
    else:
        seg = -(-(-(-k // tiles.split_k)) // tiles.block_k) * tiles.block_k
    n_seg = -(-k // seg)
    per_split = -(-n_seg // tiles.split_k)
    return seg, per_split, -(-n_seg // per_split)
