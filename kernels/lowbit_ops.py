"""torch wiring of the low-bit GEMMs: plain tensors and scalars in, a tensor out.

    lowbit_int_matmul(a_codes, ...)     integer codes x packed weight codes (uniform grids)
    lowbit_dequant_matmul(a, ...)       float activations x packed weight codes (every grid)
    lowbit_int_accumulators(...)        the integer GEMM's exact int32 sums (for tests)

The caller (qat.packed.linear) derives the integer forms, scales and level tables from the
packed format; nothing here knows a config or a grid. The torch references are
qat.packed.linear.integer_matmul and F.linear(a, format.dequantize(...)).
Triton is imported on first use (TRITON_INTERPRET is read then).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from qat.kernels.lowbit_plan import GemmTiles, gemm_tiles, kernel_bits, row_bytes, segment_plan
from qat.kernels.plan import interpreting


class IntForm(NamedTuple):
    """One side's integer form (format.IntegerForm): u = code_mul * code - code_shift is int8,
    q = mul * u + offset is the integer the value is a multiple of."""

    code_mul: int
    code_shift: int
    mul: int
    offset: int


@functools.cache
def _kernels():
    from qat.kernels import lowbit_gemm

    return lowbit_gemm


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _check_device(t: Tensor, name: str) -> None:
    if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
        raise ValueError(f"{name} is on {t.device}; the low-bit kernels need CUDA, or the CPU with TRITON_INTERPRET=1")


def _check_weight(w_packed: Tensor, bits: float, n_codes: int, w_scale: Tensor, k: int) -> None:
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or w_packed.stride(1) != 1:
        raise ValueError(f"w_packed is {w_packed.dtype} {tuple(w_packed.shape)}; it must be uint8 [N, row_bytes] with contiguous rows")
    if w_packed.numel() >= 2**31:
        raise ValueError(f"w_packed has {w_packed.numel()} bytes; the kernels address a weight with int32 offsets (< 2**31)")
    if w_packed.shape[1] != row_bytes(n_codes, bits):
        raise ValueError(f"w_packed has {w_packed.shape[1]} bytes a row; {n_codes} codes at bits={bits} take {row_bytes(n_codes, bits)}")
    if w_scale.dtype != torch.float32 or w_scale.shape[0] != w_packed.shape[0] or k % w_scale.shape[1]:
        raise ValueError(f"w_scale is {w_scale.dtype} {tuple(w_scale.shape)}; it must be float32 [N, G] with G dividing K={k}")


def _tiles(tiles: GemmTiles | None, integer: bool, m: int, n: int, k: int, group: int, device: torch.device) -> GemmTiles:
    return tiles or gemm_tiles(integer=integer, m=m, n=n, k=k, segment=group, sms=_sms(device))


def _int_launch(a_codes, a_form, a_scale, w_packed, bits, w_form, w_scale, divisor, bias, out_dtype, tiles, store_acc):
    if a_codes.dim() != 2 or a_codes.dtype.is_floating_point or a_codes.dtype == torch.bool:
        raise ValueError(f"a_codes is {a_codes.dtype} {tuple(a_codes.shape)}; it must be an integer [M, K] tensor")
    _check_device(a_codes, "a_codes")
    m, k = a_codes.shape
    _check_weight(w_packed, bits, k, w_scale, k)
    if a_scale.dtype != torch.float32 or a_scale.shape[0] != m or k % a_scale.shape[1]:
        raise ValueError(f"a_scale is {a_scale.dtype} {tuple(a_scale.shape)}; it must be float32 [M, G] with G dividing K={k}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype={out_dtype} is not allowed; use float32, bfloat16 or float16")
    group = math.gcd(k // a_scale.shape[1], k // w_scale.shape[1])
    tiles = _tiles(tiles, True, m, w_packed.shape[0], k, group, a_codes.device)
    plan = segment_plan(k, group, tiles)
    b, tern = kernel_bits(bits)
    return _kernels().int_gemm(
        a_codes, tuple(a_form), a_scale.contiguous(), w_packed, b, tern, k, tuple(w_form), w_scale.contiguous(),
        1.0 / divisor, bias, out_dtype, tiles, plan, store_acc,
    )  # fmt: skip


def lowbit_int_matmul(
    a_codes: Tensor, a_form: IntForm, a_scale: Tensor, w_packed: Tensor, bits: float, w_form: IntForm, w_scale: Tensor,
    *, divisor: float, bias: Tensor | None = None, out_dtype: torch.dtype = torch.float32, tiles: GemmTiles | None = None,
) -> Tensor:
    """y [M, N] = sum_k q_a q_w * a_scale * w_scale / divisor (+ bias), in out_dtype.

    a_codes: integer grid codes [M, K] (any integer dtype, any strides); a_scale: float32
    [M, Ga] (one scale per row or per group of K/Ga columns). w_packed: uint8 [N, row_bytes]
    holding K codes a row at `bits` (1..8, or 1.58 ternary); w_scale: float32 [N, Gw].
    divisor: d_a * d_w of the two integer forms. The integer sums are exact in int32.
    """
    return _int_launch(a_codes, a_form, a_scale, w_packed, bits, w_form, w_scale, divisor, bias, out_dtype, tiles, False)[0]


def lowbit_int_accumulators(
    a_codes: Tensor, a_form: IntForm, a_scale: Tensor, w_packed: Tensor, bits: float, w_form: IntForm, w_scale: Tensor,
    *, tiles: GemmTiles | None = None,
) -> Tensor:
    """The integer GEMM's int32 sums of q_a q_w, [M, N, S], one per segment: S = the finer side's
    scale groups, or (per-row scales) the tiles' split_k parts of K."""
    return _int_launch(a_codes, a_form, a_scale, w_packed, bits, w_form, w_scale, 1.0, None, torch.float32, tiles, True)[1]


def lowbit_dequant_matmul(
    a: Tensor, w_packed: Tensor, bits: float, w_scale: Tensor, *, center: float | None = None, levels: Tensor | None = None,
    positions: Tensor | None = None, bias: Tensor | None = None, tiles: GemmTiles | None = None,
) -> Tensor:
    """y [M, N] = a @ W^T (+ bias) in a's dtype, with W decoded from its packed codes in the kernel.

    a: float32 / bfloat16 / float16 [M, K], any strides. W's values: (code - center) *
    (w_scale / center) on a uniform grid (give `center`), levels[code] * w_scale otherwise
    (give `levels`, any float dtype). positions: uint8 [N, row_bytes(K/2, 2)] for 2:4 weights,
    whose w_packed then holds the K/2 kept codes a row (format.py).
    """
    if a.dim() != 2 or a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"a is {a.dtype} {tuple(a.shape)}; it must be a float32, bfloat16 or float16 [M, K] tensor")
    if (center is None) == (levels is None):
        raise ValueError("give exactly one of center (a uniform grid) or levels (a level table)")
    _check_device(a, "a")
    m, k = a.shape
    sparse = positions is not None
    if sparse and (k % 4 or positions.dtype != torch.uint8 or positions.shape != (w_packed.shape[0], row_bytes(k // 2, 2))):
        raise ValueError(f"positions is {positions.dtype} {tuple(positions.shape)}; 2:4 needs uint8 [N, {row_bytes(k // 2, 2)}] and K % 4 == 0")
    _check_weight(w_packed, bits, k // 2 if sparse else k, w_scale, k)
    tiles = _tiles(tiles, False, m, w_packed.shape[0], k, k // w_scale.shape[1], a.device)
    plan = segment_plan(k, k // w_scale.shape[1], tiles)
    b, tern = kernel_bits(bits)
    return _kernels().dequant_gemm(
        a, w_packed, positions, b, tern, k, float(center or 0.0), levels, w_scale.contiguous(), bias, tiles, plan
    )
