"""Triton kernels of the packed low-bit forward: an integer GEMM and a dequantizing GEMM.

Both read the weight as the packed format stores it (qat/packed/packing.py: rows of bytes, an
LSB-first bitstream of b-bit codes, or five base-3 digits a byte) and decode it in registers;
the full-width weight never exists in memory. Per [BLOCK_K, BLOCK_N] weight tile:

- b in {1, 2, 4, 8}: codes never cross a byte. The tile's byte range [BLOCK_K*b/8, BLOCK_N] is
  loaded once (contiguous along K: vectorised, coalesced loads), then every byte is expanded
  into its 8/b codes by shifts (a [bytes, 8/b, N] broadcast reshaped to [K, N]).
- b in {3, 5, 6, 7}: a code may straddle two bytes, so each code loads the two adjacent bytes
  holding it and shifts. Neighbouring codes load the same bytes; those repeats are served by
  L1 (each byte still comes from DRAM once); it costs issue slots, not bandwidth.
- ternary: digit d of byte x is floor(x / 3**d) mod 3, computed with multiply-shift
  reciprocals (integer division is ~20 instructions on a GPU; this is 4).

Integer GEMM: activation codes (any integer dtype: the fused quantizer emits int32) become
u = code_mul * code - code_shift, and the weight codes likewise, both in int8. tl.dot on
int8 with int32 accumulation (Hopper: wgmma .s8, twice the bf16 rate; there is no int4 MMA),
then the exact integer sum of q = mul * u + offset products per segment via row-sum
corrections (format.IntegerForm), scaled by s_a * s_w / (d_a * d_w) in fp32.

Dequantizing GEMM: value = (code - c) * (s / c) on uniform grids, levels[code] * s otherwise,
in fp32, the same operations as the torch reference (format.dequantize); then cast to the
activation's dtype for a bf16/fp16 MMA (fp32 IEEE dot for fp32 inputs and in the interpreter,
whose bf16 dot is not faithful). 2:4 weights expand their kept codes in registers.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from qat.kernels.lowbit_plan import TERNARY_RECIPROCALS
from qat.kernels.plan import interpreting

_R0, _R1, _R2, _R3, _R4 = (tl.constexpr(r) for r in TERNARY_RECIPROCALS)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile of this program, visited in groups of GROUP_M tile rows: consecutive
    programs share weight columns while they sit in L2."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _ternary_digit(x, d):
    """floor(x / 3**d) % 3 for bytes x <= 242 (int32), by exact multiply-shift reciprocals."""
    r = tl.where(d == 0, _R0, tl.where(d == 1, _R1, tl.where(d == 2, _R2, tl.where(d == 3, _R3, _R4))))
    q = (x * r) >> 16
    return q - 3 * ((q * 171) >> 9)


@triton.jit
def _codes_at(ptr, row_off, idx, ok, n_bytes, BITS: tl.constexpr, TERNARY: tl.constexpr):
    """Codes idx (any index tensor) of the packed rows starting at ptr + row_off, as int32; 0 where not ok.
    Offsets are int32 (lowbit_ops checks the size): 64-bit pointers per element would double the
    registers the addresses of a gathered tile take."""
    if TERNARY:
        byte = tl.load(ptr + (row_off + idx // 5), mask=ok, other=0).to(tl.int32)
        return _ternary_digit(byte, idx % 5)
    bit = idx * BITS
    v = tl.load(ptr + (row_off + (bit >> 3)), mask=ok, other=0).to(tl.int32)
    if 8 % BITS != 0:  # the code may continue in the next byte (absent past the row's end)
        nxt = (bit >> 3) + 1
        v = v | (tl.load(ptr + (row_off + nxt), mask=ok & (nxt < n_bytes), other=0).to(tl.int32) << 8)
    return (v >> (bit & 7)) & ((1 << BITS) - 1)


@triton.jit
def _codes_tile(w_ptr, stride_wn, offs_n, n_ok, k0, K, n_bytes, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                BITS: tl.constexpr, TERNARY: tl.constexpr):
    """Weight codes of columns k0 .. k0+BLOCK_K-1 (k0 % 8 == 0) of rows offs_n: int32 [BLOCK_K, BLOCK_N].
    Columns past K hold the format's zero padding (callers mask them)."""
    row_off = offs_n[None, :] * stride_wn
    if not TERNARY and 8 % BITS == 0:
        PER: tl.constexpr = 8 // BITS
        b = k0 // PER + tl.arange(0, BLOCK_K // PER)[:, None]
        byte = tl.load(w_ptr + (row_off + b), mask=(b < n_bytes) & n_ok[None, :], other=0).to(tl.int32)
        if PER == 1:
            return byte
        shifts = (tl.arange(0, PER) * BITS)[None, :, None]
        codes = (byte[:, None, :] >> shifts) & ((1 << BITS) - 1)  # [bytes, PER, N]: code byte*PER + j
        return tl.reshape(codes, (BLOCK_K, BLOCK_N))
    kk = k0 + tl.arange(0, BLOCK_K)[:, None]
    return _codes_at(w_ptr, row_off, kk, (kk < K) & n_ok[None, :], n_bytes, BITS, TERNARY)


@triton.jit
def _store_out(y, bias_ptr, out_ptr, offs_m, offs_n, M, N, pid_k, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Bias and the output's dtype with one split; fp32 partials [SPLIT_K, M, N] with several."""
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + offs, y, mask=ok)


@triton.jit
def _segment_sum(a_rows, stride_ak, w_ptr, stride_wn, offs_m, offs_n, m_ok, n_ok, k_start, k_end, K, n_bytes,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                 TERNARY: tl.constexpr, A_CM: tl.constexpr, A_CS: tl.constexpr, A_MUL: tl.constexpr,
                 A_OFF: tl.constexpr, W_CM: tl.constexpr, W_CS: tl.constexpr, W_MUL: tl.constexpr, W_OFF: tl.constexpr):
    """sum over k in [k_start, k_end) of q_a q_w: int32 [BLOCK_M, BLOCK_N], exact."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    sum_a = tl.zeros((BLOCK_M,), dtype=tl.int32)
    sum_w = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        a_ok = m_ok[:, None] & k_ok[None, :]
        codes = tl.load(a_rows + kk[None, :] * stride_ak, mask=a_ok, other=0).to(tl.int32)
        ua = tl.where(a_ok, codes * A_CM - A_CS, 0)  # u past K or M is 0: no product, no row sum
        wc = _codes_tile(w_ptr, stride_wn, offs_n, n_ok, k0, K, n_bytes, BLOCK_K, BLOCK_N, BITS, TERNARY)
        uw = tl.where(k_ok[:, None] & n_ok[None, :], wc * W_CM - W_CS, 0)
        acc = tl.dot(ua.to(tl.int8), uw.to(tl.int8), acc, out_dtype=tl.int32)
        if A_MUL * W_OFF != 0:
            sum_a += tl.sum(ua, axis=1)
        if A_OFF * W_MUL != 0:
            sum_w += tl.sum(uw, axis=0)
    # sum q_a q_w = ma mw sum u_a u_w + ma ow sum u_a + oa mw sum u_w + oa ow (columns)
    q = acc * (A_MUL * W_MUL)
    if A_MUL * W_OFF != 0:
        q += (A_MUL * W_OFF) * sum_a[:, None]
    if A_OFF * W_MUL != 0:
        q += (A_OFF * W_MUL) * sum_w[None, :]
    if A_OFF * W_OFF != 0:
        q += (A_OFF * W_OFF) * (k_end - k_start)
    return q


@triton.jit
def _scaled_segment(s, a_rows, stride_ak, w_ptr, stride_wn, sa_ptr, sw_ptr, acc_ptr, offs_m, offs_n, m_ok, n_ok, N, K,
                    n_bytes, n_seg, SEG, GA, GW, GROUP_A, GROUP_W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BITS: tl.constexpr, TERNARY: tl.constexpr, A_CM: tl.constexpr,
                    A_CS: tl.constexpr, A_MUL: tl.constexpr, A_OFF: tl.constexpr, W_CM: tl.constexpr,
                    W_CS: tl.constexpr, W_MUL: tl.constexpr, W_OFF: tl.constexpr, STORE_ACC: tl.constexpr):
    """Segment s's integer sum times its two scales (fp32 [BLOCK_M, BLOCK_N]); stores the sum if asked."""
    k_end = tl.minimum((s + 1) * SEG, K)
    q = _segment_sum(a_rows, stride_ak, w_ptr, stride_wn, offs_m, offs_n, m_ok, n_ok, s * SEG, k_end, K, n_bytes,
                     BLOCK_M, BLOCK_N, BLOCK_K, BITS, TERNARY, A_CM, A_CS, A_MUL, A_OFF, W_CM, W_CS, W_MUL, W_OFF)
    if STORE_ACC:
        offs = (offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]) * n_seg + s
        tl.store(acc_ptr + offs, q, mask=m_ok[:, None] & n_ok[None, :])
    sa = tl.load(sa_ptr + offs_m * GA + (s * SEG) // GROUP_A, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + offs_n * GW + (s * SEG) // GROUP_W, mask=n_ok, other=0.0)
    return q.to(tl.float32) * sa[:, None] * sw[None, :]


@triton.jit
def _int_gemm_kernel(
    a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, out_ptr, acc_ptr,
    M, N, K, stride_am, stride_ak, stride_wn, GA, GW, GROUP_A, GROUP_W, SEG, SEGS_PER_SPLIT, inv_div,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BITS: tl.constexpr, TERNARY: tl.constexpr, A_CM: tl.constexpr, A_CS: tl.constexpr, A_MUL: tl.constexpr,
    A_OFF: tl.constexpr, W_CM: tl.constexpr, W_CS: tl.constexpr, W_MUL: tl.constexpr, W_OFF: tl.constexpr,
    SPLIT_K: tl.constexpr, SEGMENTED: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_ACC: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    n_bytes = (K + 4) // 5 if TERNARY else (K * BITS + 7) // 8
    n_seg = tl.cdiv(K, SEG)
    # SEGMENTED (several scale groups per program) keeps an fp32 sum next to the int32 one;
    # with one segment (per-row scales) the int32 accumulator is the only one: half the
    # registers, which is what lets 128 x 128 tiles run without spilling.
    if SEGMENTED:
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(pid_k * SEGS_PER_SPLIT, tl.minimum((pid_k + 1) * SEGS_PER_SPLIT, n_seg)):
            y += _scaled_segment(
                s, a_rows, stride_ak, w_ptr, stride_wn, sa_ptr, sw_ptr, acc_ptr, offs_m, offs_n, m_ok, n_ok, N, K, n_bytes,
                n_seg, SEG, GA, GW, GROUP_A, GROUP_W, BLOCK_M, BLOCK_N, BLOCK_K, BITS, TERNARY,
                A_CM, A_CS, A_MUL, A_OFF, W_CM, W_CS, W_MUL, W_OFF, STORE_ACC)  # fmt: skip
    else:
        y = _scaled_segment(
            pid_k, a_rows, stride_ak, w_ptr, stride_wn, sa_ptr, sw_ptr, acc_ptr, offs_m, offs_n, m_ok, n_ok, N, K, n_bytes,
            n_seg, SEG, GA, GW, GROUP_A, GROUP_W, BLOCK_M, BLOCK_N, BLOCK_K, BITS, TERNARY,
            A_CM, A_CS, A_MUL, A_OFF, W_CM, W_CS, W_MUL, W_OFF, STORE_ACC)  # fmt: skip
    _store_out(y * inv_div, bias_ptr, out_ptr, offs_m, offs_n, M, N, pid_k, SPLIT_K, HAS_BIAS)


@triton.jit
def _dequant_tile(w_ptr, pos_ptr, table, sw_ptr, stride_wn, stride_pn, offs_n, n_ok, k0, K, center, GW, GROUP_W,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, TERNARY: tl.constexpr,
                  UNIFORM: tl.constexpr, SPARSE: tl.constexpr):
    """Weight values of columns k0 .. k0+BLOCK_K-1: fp32 [BLOCK_K, BLOCK_N], format.dequantize's ops."""
    s = tl.load(sw_ptr + offs_n * GW + k0 // GROUP_W, mask=n_ok, other=0.0)[None, :]  # one group per tile
    if SPARSE:
        # Column k of group k // 4 holds kept code j = 2 (k // 4) or j + 1 if its 2-bit in-group
        # position says so, else 0. Both candidates are gathered; positions are 2-bit codes.
        kk = k0 + tl.arange(0, BLOCK_K)[:, None]
        ok = (kk < K) & n_ok[None, :]
        half = K // 2
        w_off, p_off = offs_n[None, :] * stride_wn, offs_n[None, :] * stride_pn
        w_bytes = (half + 4) // 5 if TERNARY else (half * BITS + 7) // 8
        j0 = 2 * (kk // 4)
        p0 = _codes_at(pos_ptr, p_off, j0, ok, (half * 2 + 7) // 8, 2, False)
        p1 = _codes_at(pos_ptr, p_off, j0 + 1, ok, (half * 2 + 7) // 8, 2, False)
        first = (kk % 4) == p0
        codes = tl.where(first, _codes_at(w_ptr, w_off, j0, ok, w_bytes, BITS, TERNARY),
                         _codes_at(w_ptr, w_off, j0 + 1, ok, w_bytes, BITS, TERNARY))
        keep = first | ((kk % 4) == p1)
    else:
        n_bytes = (K + 4) // 5 if TERNARY else (K * BITS + 7) // 8
        codes = _codes_tile(w_ptr, stride_wn, offs_n, n_ok, k0, K, n_bytes, BLOCK_K, BLOCK_N, BITS, TERNARY)
    if UNIFORM:
        w = (codes.to(tl.float32) - center) * tl.math.div_rn(s, center)
    else:
        w = tl.reshape(tl.gather(table, tl.reshape(codes, (BLOCK_K * BLOCK_N,)), 0), (BLOCK_K, BLOCK_N)) * s
    if SPARSE:
        w = tl.where(keep, w, 0.0)
    return w


@triton.jit
def _dequant_gemm_kernel(
    a_ptr, w_ptr, pos_ptr, table_ptr, sw_ptr, bias_ptr, out_ptr,
    M, N, K, stride_am, stride_ak, stride_wn, stride_pn, GW, GROUP_W, K_PER_SPLIT, center, N_LEVELS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BITS: tl.constexpr, TERNARY: tl.constexpr, UNIFORM: tl.constexpr, SPARSE: tl.constexpr,
    LEVELS: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # A level table (gaussian / fp4: <= 256 levels, padded to LEVELS) is read once per program
    # and looked up with tl.gather (a shared-memory table on the GPU): a per-element global
    # gather would be staged by the software pipeline as a full fp64 tile per stage.
    table = 0.0
    if not UNIFORM:
        table = tl.load(table_ptr + tl.arange(0, LEVELS), mask=tl.arange(0, LEVELS) < N_LEVELS, other=0.0).to(tl.float32)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_hi = tl.minimum((pid_k + 1) * K_PER_SPLIT, K)
    for k0 in range(pid_k * K_PER_SPLIT, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        # a is 0 past K (or past this split): those products vanish, whatever w holds there.
        a = tl.load(a_rows + kk[None, :] * stride_ak, mask=m_ok[:, None] & (kk < k_hi)[None, :], other=0.0)
        w = _dequant_tile(w_ptr, pos_ptr, table, sw_ptr, stride_wn, stride_pn, offs_n, n_ok, k0, K, center, GW,
                          GROUP_W, BLOCK_K, BLOCK_N, BITS, TERNARY, UNIFORM, SPARSE)
        if INTERPRET or a.dtype == tl.float32:
            y = tl.dot(a.to(tl.float32), w, y, input_precision="ieee")
        else:
            y = tl.dot(a, w.to(a.dtype), y)
    _store_out(y, bias_ptr, out_ptr, offs_m, offs_n, M, N, pid_k, SPLIT_K, HAS_BIAS)


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _finish(out: torch.Tensor, splits: int, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Sum split-K partials in a fixed order (deterministic), add the bias, cast."""
    if splits == 1:
        return out
    y = out.sum(0)
    return (y if bias is None else y + bias.float()).to(dtype)


def int_gemm(a, a_form, sa, w, bits, tern, k, w_form, sw, inv_div, bias, out_dtype, tiles, plan, store_acc):
    """Launch the integer GEMM (arguments validated by lowbit_ops). Returns (out, acc or None)."""
    m, n = a.shape[0], w.shape[0]
    seg, per_split, splits = plan
    n_seg = -(-k // seg)
    out = torch.empty((m, n) if splits == 1 else (splits, m, n), device=a.device, dtype=out_dtype if splits == 1 else torch.float32)
    acc = torch.empty((m, n, n_seg) if store_acc else (0,), device=a.device, dtype=torch.int32)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n), splits)
    with _on_device(a.device):
        _int_gemm_kernel[grid](
            a, w, sa, sw, bias if bias is not None else sw, out, acc,
            m, n, k, a.stride(0), a.stride(1), w.stride(0), sa.shape[1], sw.shape[1], k // sa.shape[1], k // sw.shape[1],
            seg, per_split, inv_div,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
            BITS=bits, TERNARY=tern, A_CM=a_form[0], A_CS=a_form[1], A_MUL=a_form[2], A_OFF=a_form[3],
            W_CM=w_form[0], W_CS=w_form[1], W_MUL=w_form[2], W_OFF=w_form[3],
            SPLIT_K=splits, SEGMENTED=per_split > 1, HAS_BIAS=bias is not None, STORE_ACC=store_acc,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return _finish(out, splits, bias, out_dtype), (acc if store_acc else None)


def dequant_gemm(a, w, positions, bits, tern, k, center, table, sw, bias, tiles, plan):
    """Launch the dequantizing GEMM (arguments validated by lowbit_ops). Output in a's dtype."""
    m, n = a.shape[0], w.shape[0]
    seg, per_split, splits = plan
    out = torch.empty((m, n) if splits == 1 else (splits, m, n), device=a.device, dtype=a.dtype if splits == 1 else torch.float32)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n), splits)
    sparse = positions is not None
    n_levels = 1 if table is None else table.numel()
    with _on_device(a.device):
        _dequant_gemm_kernel[grid](
            a, w, positions if sparse else w, table if table is not None else sw, sw, bias if bias is not None else sw, out,
            m, n, k, a.stride(0), a.stride(1), w.stride(0), positions.stride(0) if sparse else 0,
            sw.shape[1], k // sw.shape[1], seg * per_split, center, n_levels,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
            BITS=bits, TERNARY=tern, UNIFORM=table is None, SPARSE=sparse, LEVELS=triton.next_power_of_2(n_levels),
            SPLIT_K=splits, HAS_BIAS=bias is not None,
            INTERPRET=interpreting(), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    return _finish(out, splits, bias, a.dtype)
