"""Triton kernels: fused Hadamard rotation + RMS scale + grid rounding + gradient mask, and
the fused backward H(g ⊙ mask).

Forward, per program: `block_m` rows, swept in [block_m, tile_k] tiles (see plan.py).

- Rotation: `tl.dot` with exact ±1 Hadamard factors (fp32 accumulation, 1/sqrt(b) after),
  one matmul for blocks <= 128, two (a Kronecker split with a register transpose) above.
  fp32 operands are split into three bf16 pieces (8 + 8 + 8 mantissa bits hold all 24),
  so the products by ±1 stay exact on bf16 tensor cores; bf16 operands go in directly.
- The rotated values are rounded to x's dtype before anything else, because the torch
  path quantizes `hadamard_transform(x)`, which returns x's dtype; the RMS, codes and mask
  are then computed from exactly the values the torch path sees.
- RMS: the RMS is rotation-invariant, but the RMS of the *rounded* rotated values is not
  the RMS of x (for bf16 they differ by ~1e-4 relative, enough to move ~1e-4 of the
  codes), so it is summed over the rotated tiles. When the row is one tile everything
  stays in registers (one read of x, one write of each output). Otherwise sweep 1 rotates
  each tile, stores the rotated values into the output buffer and accumulates sum(xr^2);
  sweep 2 reads them back and overwrites them with the quantized values. A program holds
  block_m * K values (8 rows: 64 KB of bf16 at K = 4096), so with ~2 programs per SM the
  re-read hits L2: DRAM traffic stays one read of x plus one write of each output, and
  the second sweep costs L2 bandwidth, not a second rotation.
- Rounding repeats the torch path's rounding (`round_to_grid`) float ops one by one: t = xr / s (IEEE
  division), clamp to [-1, 1], floor(t * center + (center + 1/2)), q = (code - center) *
  (s / center). Kernels are launched with fp fusion off so that t * center + offset is
  not contracted into an FMA (which would round differently from torch).

Triton is imported here only; `kernels.ops` imports this module on first use, so that
TRITON_INTERPRET is read when the first kernel is built, not when `kernels` is imported.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from qat.kernels.plan import ESTIMATOR_CODES, QuantScalars, Tiling, interpreting


@triton.jit
def _dot_pm1(v, h, INTERPRET: tl.constexpr):
    """v @ h for h with entries in {-1, 0, 1}: exact products, fp32 accumulation."""
    if v.dtype == tl.bfloat16 and not INTERPRET:
        return tl.dot(v, h, out_dtype=tl.float32)
    v = v.to(tl.float32)
    hi = v.to(tl.bfloat16).to(tl.float32)
    rest = v - hi
    mid = rest.to(tl.bfloat16).to(tl.float32)
    lo = rest - mid  # <= 8 significant bits left: exact in bf16
    # The interpreter's bf16 tl.dot is wrong; there the pieces are multiplied in fp32
    # (the products by ±1 are exact either way, so the result is the same).
    acc = tl.dot(hi.to(h.dtype), h, out_dtype=tl.float32)
    acc = tl.dot(mid.to(h.dtype), h, acc, out_dtype=tl.float32)
    return tl.dot(lo.to(h.dtype), h, acc, out_dtype=tl.float32)


@triton.jit
def _rotate(v, h_inner, h_outer, inv_sqrt, BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, INNER: tl.constexpr,
            OUTER: tl.constexpr, INTERPRET: tl.constexpr):
    """[BLOCK_M, TILE_K] tile @ blockdiag(H_b / sqrt(b)), in fp32."""
    y = _dot_pm1(tl.reshape(v, (BLOCK_M * TILE_K // INNER, INNER)), h_inner, INTERPRET)
    if OUTER > 1:
        # H_b = H_outer ⊗ H_inner: the tile row is an [OUTER, INNER] matrix X, and
        # vec(X) @ H_b = vec(H_outer X H_inner); mix the outer index via a transpose.
        y = tl.permute(tl.reshape(y, (BLOCK_M, OUTER, INNER)), (0, 2, 1))
        y = _dot_pm1(tl.reshape(y, (BLOCK_M * INNER, OUTER)), h_outer, INTERPRET)
        y = tl.permute(tl.reshape(y, (BLOCK_M, INNER, OUTER)), (0, 2, 1))
    return tl.reshape(y, (BLOCK_M, TILE_K)) * inv_sqrt


@triton.jit
def _sylvester(N: tl.constexpr, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """blockdiag(H_BLOCK, ...) as an [N, N] ±1/0 matrix, generated in registers:
    Sylvester's H[i, j] = (-1)^popcount(i & j), zero across blocks."""
    i = tl.arange(0, N)[:, None]
    j = tl.arange(0, N)[None, :]
    p = i & j & (BLOCK - 1)
    p ^= p >> 8
    p ^= p >> 4
    p ^= p >> 2
    p ^= p >> 1
    h = tl.where((p & 1) == 0, 1.0, -1.0)
    if BLOCK < N:
        h = tl.where((i // BLOCK) == (j // BLOCK), h, 0.0)
    return h.to(DTYPE)


@triton.jit
def _factors(BLOCK: tl.constexpr, INNER: tl.constexpr, OUTER: tl.constexpr, INTERPRET: tl.constexpr):
    """The (inner, outer) ±1 factors of a tile's rotation; outer is unused (a copy) when OUTER == 1."""
    # The interpreter's bf16 tl.dot is wrong, so the factors are fp32 there.
    dtype: tl.constexpr = tl.float32 if INTERPRET else tl.bfloat16
    h_inner = _sylvester(INNER, INNER if OUTER > 1 else BLOCK, dtype)
    if OUTER > 1:
        h_outer = _sylvester(OUTER, OUTER, dtype)
    else:
        h_outer = h_inner
    return h_inner, h_outer


@triton.jit
def _quantize_store(xr, rms, out_ptr, mask_ptr, codes_ptr, offs, ok, scale_factor, center, offset, trust, clip,
                    ESTIMATOR: tl.constexpr, STORE_CODES: tl.constexpr):
    """Round a rotated fp32 tile to the grid and store value, mask and codes (round_to_grid's ops)."""
    s = scale_factor * rms  # [BLOCK_M]
    step = tl.math.div_rn(s, center)
    t = tl.math.div_rn(xr, s[:, None])
    t = tl.minimum(tl.maximum(t, -1.0), 1.0)
    code = tl.floor(t * center + offset)
    q = (code - center) * step[:, None]
    tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=ok)
    if ESTIMATOR == 0:  # trust: |q - x| <= trust * rms
        tl.store(mask_ptr + offs, (tl.abs(q - xr) <= (trust * rms)[:, None]).to(tl.uint8), mask=ok)
    if ESTIMATOR == 2:  # clip: |x| <= clip * s
        tl.store(mask_ptr + offs, (tl.abs(xr) <= (clip * s)[:, None]).to(tl.uint8), mask=ok)
    if STORE_CODES:
        tl.store(codes_ptr + offs, code.to(tl.int32), mask=ok)


@triton.jit
def _quantize_row_block(
    row0, h_inner, h_outer, x_ptr, out_ptr, mask_ptr, codes_ptr, scale_ptr,
    M, K, inv_sqrt, scale_factor, center, offset, trust, clip,
    BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, INNER: tl.constexpr, OUTER: tl.constexpr,
    NUM_TILES: tl.constexpr, ROTATE: tl.constexpr, ESTIMATOR: tl.constexpr, STORE_CODES: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Quantize rows row0 .. row0 + BLOCK_M - 1 (all K columns)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, TILE_K)
    row_ok = rows < M
    base = rows.to(tl.int64)[:, None] * K  # x, out, mask and codes are contiguous [M, K]
    if NUM_TILES == 1:
        ok = row_ok[:, None] & (cols[None, :] < K)
        xr = tl.load(x_ptr + base + cols[None, :], mask=ok, other=0.0)
        if ROTATE:
            xr = _rotate(xr, h_inner, h_outer, inv_sqrt, BLOCK_M, TILE_K, INNER, OUTER, INTERPRET)
        xr = xr.to(x_ptr.dtype.element_ty).to(tl.float32)
        rms = tl.maximum(tl.sqrt_rn(tl.math.div_rn(tl.sum(xr * xr, axis=1), K.to(tl.float32))), 1e-12)
        _quantize_store(xr, rms, out_ptr, mask_ptr, codes_ptr, base + cols[None, :], ok, scale_factor, center,
                        offset, trust, clip, ESTIMATOR, STORE_CODES)
    else:
        sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # Sweep 1: rotate, park the rotated values (in x's dtype) in the output, sum squares.
        for k0 in range(0, K, TILE_K):
            offs = base + (k0 + cols)[None, :]
            ok = row_ok[:, None] & ((k0 + cols) < K)[None, :]
            xr = tl.load(x_ptr + offs, mask=ok, other=0.0)
            if ROTATE:
                xr = _rotate(xr, h_inner, h_outer, inv_sqrt, BLOCK_M, TILE_K, INNER, OUTER, INTERPRET)
                xr = xr.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + offs, xr, mask=ok)
            xr = xr.to(tl.float32)
            sumsq += tl.sum(xr * xr, axis=1)
        rms = tl.maximum(tl.sqrt_rn(tl.math.div_rn(sumsq, K.to(tl.float32))), 1e-12)
        # Other threads of this program wrote the values sweep 2 reads: order them.
        tl.debug_barrier()
        # Sweep 2: quantize (unrotated rows are simply read again from x).
        for k0 in range(0, K, TILE_K):
            offs = base + (k0 + cols)[None, :]
            ok = row_ok[:, None] & ((k0 + cols) < K)[None, :]
            if ROTATE:
                xr = tl.load(out_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
            else:
                xr = tl.load(x_ptr + offs, mask=ok, other=0.0)
            _quantize_store(xr.to(tl.float32), rms, out_ptr, mask_ptr, codes_ptr, offs, ok, scale_factor, center,
                            offset, trust, clip, ESTIMATOR, STORE_CODES)
    tl.store(scale_ptr + rows, scale_factor * rms, mask=row_ok)


@triton.jit
def _quantize_fwd_kernel(
    x_ptr, out_ptr, mask_ptr, codes_ptr, scale_ptr,
    M, K, inv_sqrt, scale_factor, center, offset, trust, clip,
    BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, BLOCK: tl.constexpr, INNER: tl.constexpr, OUTER: tl.constexpr,
    NUM_TILES: tl.constexpr, ROTATE: tl.constexpr, ESTIMATOR: tl.constexpr, STORE_CODES: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Persistent over row blocks: the ±1 factors are built once per program, and the loop
    # lets Triton prefetch the next block's tile while this one is rotated and rounded.
    if ROTATE:
        h_inner, h_outer = _factors(BLOCK, INNER, OUTER, INTERPRET)
    else:
        h_inner, h_outer = 0.0, 0.0
    for row0 in range(tl.program_id(0) * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        _quantize_row_block(row0, h_inner, h_outer, x_ptr, out_ptr, mask_ptr, codes_ptr, scale_ptr,
                            M, K, inv_sqrt, scale_factor, center, offset, trust, clip,
                            BLOCK_M, TILE_K, INNER, OUTER, NUM_TILES, ROTATE, ESTIMATOR, STORE_CODES, INTERPRET)


@triton.jit
def _masked_rotate_kernel(
    g_ptr, mask_ptr, out_ptr, M, K, inv_sqrt,
    BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, BLOCK: tl.constexpr, INNER: tl.constexpr, OUTER: tl.constexpr,
    NUM_TILES: tl.constexpr, ROTATE: tl.constexpr, USE_MASK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out = (g ⊙ mask) @ blockdiag(H_b / sqrt(b)): the backward of value w.r.t. x (H is symmetric).
    Tiles are independent; programs loop over them (persistent, as the forward)."""
    if ROTATE:
        h_inner, h_outer = _factors(BLOCK, INNER, OUTER, INTERPRET)
    else:
        h_inner, h_outer = 0.0, 0.0
    for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * NUM_TILES, tl.num_programs(0)):
        rows = (tile // NUM_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tile % NUM_TILES) * TILE_K + tl.arange(0, TILE_K)
        ok = (rows < M)[:, None] & (cols < K)[None, :]
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        g = tl.load(g_ptr + offs, mask=ok, other=0.0)
        if USE_MASK:
            g = tl.where(tl.load(mask_ptr + offs, mask=ok, other=0) != 0, g, 0.0)
        if ROTATE:
            g = _rotate(g, h_inner, h_outer, inv_sqrt, BLOCK_M, TILE_K, INNER, OUTER, INTERPRET)
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _max_programs(device: torch.device) -> int:
    # Persistent programs: about as many as are resident at once (two 8-warp programs per
    # SM at <= 128 registers). In the interpreter, two: every program then loops.
    if device.type != "cuda":
        return 2
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _inv_sqrt(block: int) -> float:
    return 1.0 / math.sqrt(block) if block else 1.0  # the same double as the torch Hadamard path


def quantize_rows(x: torch.Tensor, tiling: Tiling, sc: QuantScalars, with_codes: bool):
    """Fused forward on a contiguous [M, K] tensor. Returns (value, mask uint8, scale fp32 [M], codes int32);
    the mask is empty for the ste estimator (all ones) and codes are empty unless `with_codes`."""
    m, k = x.shape
    value = torch.empty_like(x)
    mask = torch.empty((m, k) if sc.estimator != "ste" else (0,), dtype=torch.uint8, device=x.device)
    codes = torch.empty((m, k) if with_codes else (0,), dtype=torch.int32, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return value, mask, scale, codes
    grid = (min(triton.cdiv(m, tiling.block_m), _max_programs(x.device)),)
    with _on_device(x.device):
        _quantize_fwd_kernel[grid](
            x, value, mask, codes, scale,
            m, k, _inv_sqrt(tiling.block), sc.scale_factor, sc.center, sc.center + 0.5, sc.trust, sc.clip,
            BLOCK_M=tiling.block_m, TILE_K=tiling.tile_k, BLOCK=tiling.block, INNER=tiling.inner, OUTER=tiling.outer,
            NUM_TILES=tiling.num_tiles, ROTATE=tiling.rotate, ESTIMATOR=ESTIMATOR_CODES[sc.estimator],
            STORE_CODES=with_codes, INTERPRET=interpreting(), num_warps=tiling.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return value, mask, scale, codes


def masked_rotate(grad: torch.Tensor, mask: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """Fused backward on a contiguous [M, K] gradient; an empty mask means all ones (ste)."""
    m, k = grad.shape
    out = torch.empty_like(grad)
    if m == 0:
        return out
    grid = (min(triton.cdiv(m, tiling.block_m) * tiling.num_tiles, _max_programs(grad.device)),)
    with _on_device(grad.device):
        _masked_rotate_kernel[grid](
            grad, mask, out, m, k, _inv_sqrt(tiling.block),
            BLOCK_M=tiling.block_m, TILE_K=tiling.tile_k, BLOCK=tiling.block, INNER=tiling.inner, OUTER=tiling.outer,
            NUM_TILES=tiling.num_tiles, ROTATE=tiling.rotate, USE_MASK=mask.numel() > 0, INTERPRET=interpreting(),
            num_warps=tiling.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out
