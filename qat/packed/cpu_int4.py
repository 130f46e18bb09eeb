"""The packed layer's fast CPU path: torch's int4 weight-packed matmul (the kernel gpt-fast and
torchao use on CPUs), fed with our codes.

Decoding on the CPU is bound by memory traffic, and this kernel reads 4-bit weights (a quarter
of bf16's bytes, an eighth of fp32's) and dequantizes them in registers:
`aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_and_zeros)` computes x @ W^T with
W[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n] for q in 0..15.

A uniform grid of n <= 16 levels (int, int_zero, ternary; 1 to 4 bits) decodes as
value = (code - c) * s / c (c its center, s the row's or group's scale), which is that form
with q = code + 8 - ceil(c), scale = s / c and zero = (ceil(c) - c) * s / c: the same values,
so the output is the reference path's (qat.packed.linear, "dequantize") up to the model
dtype's summation order. Only bfloat16 models take it: the kernel is vectorized for bfloat16
activations alone (see int4_unsupported_reason). Other layers (float32 models, gaussian / fp4
grids, 8 bits, 2:4, N not a multiple of 16) run the reference computation with their decoded
weight kept after the first call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from qat.quant.config import QuantizerConfig
from qat.quant.grids import Grid

GROUP_SIZES = (256, 128, 64, 32)  # the kernel's quantization group sizes, largest first
N_MULTIPLE = 16  # the packing's row tiles


class Int4Weight(NamedTuple):
    packed: torch.Tensor  # uint8 [N, K/2] in the kernel's layout
    group: int  # the kernel's group size (divides the weight's own scale group)
    scales_and_zeros: torch.Tensor  # [K/group, N, 2]


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _shift(grid: Grid) -> int:
    return 8 - math.ceil(grid.center)


def int4_unsupported_reason(
    cfg: QuantizerConfig, grid: Grid | None, out_features: int, in_features: int, scale_groups: int, dtype: torch.dtype
) -> str | None:
    """None when the int4 kernel computes this packed weight (in a model of `dtype`), else why not."""
    if not int4_kernel_available():
        return "this torch has no int4 CPU kernel"
    if dtype != torch.bfloat16:
        # It accepts float32 and float16 too, but only bfloat16 is vectorized: a 1536 x 576
        # GEMV took 0.028 ms with bfloat16 activations, 0.78 ms with float32 (fp32 F.linear:
        # 0.073 ms), and 5.4 ms against 409 ms at 512 rows (2-core AMD EPYC, torch 2.13).
        return f"dtype {dtype} (the kernel is fast only on bfloat16 activations)"
    if grid is None or not cfg.enabled:
        return "a 16-bit weight"
    if not grid.uniform or grid.size > 16:
        return f"grid={cfg.grid!r} at {cfg.bits} bits (the kernel decodes 16 uniform levels)"
    if cfg.sparsity != "none":
        return "2:4 sparsity"
    if not (0 <= _shift(grid) and grid.size - 1 + _shift(grid) <= 15):
        return f"the codes of grid={cfg.grid!r} do not fit 0..15"
    if out_features % N_MULTIPLE:
        return f"out_features={out_features} is not a multiple of {N_MULTIPLE}"
    if not any((in_features // scale_groups) % g == 0 for g in GROUP_SIZES):
        return f"the scale group of {in_features // scale_groups} is not a multiple of {GROUP_SIZES[-1]}"
    return None


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, grid: Grid) -> Int4Weight:
    """Codes uint8 [N, K] and scales [N, G] (the packed format's) -> the kernel's operands."""
    n, k = codes.shape
    own_group = k // scale.shape[1]
    group = next(g for g in GROUP_SIZES if own_group % g == 0)
    q = codes.to(torch.int32) + _shift(grid)
    unit = (scale.double() / grid.center).repeat_interleave(own_group // group, dim=1)  # [N, K/group]
    zero = unit * (math.ceil(grid.center) - grid.center)
    scales_and_zeros = torch.stack((unit, zero), dim=-1).transpose(0, 1).contiguous()  # [K/group, N, 2]
    return Int4Weight(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1), group, scales_and_zeros)


def int4_linear(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """x [M, K] (float32 or bfloat16) @ W^T -> [M, N] in x's dtype."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight.packed, weight.group, weight.scales_and_zeros.to(x.dtype))
