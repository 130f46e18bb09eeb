"""torch wiring of the fused kernels: two custom ops, their autograd formula, `fused_quantize`.

The kernels are wrapped in `torch.library.custom_op`s with fake (meta) implementations, so
`torch.compile` traces through `fused_quantize` without graph breaks and treats each kernel
as one opaque node; `register_autograd` attaches the backward (itself a custom op, so the
compiled backward graph holds it too):

    value = quantize_rows(x)            d value / d x = H^T (g ⊙ mask) = H (g ⊙ mask)

which is what autograd gives through `hadamard_transform` + `MaskedStraightThrough` on the
torch path. The ops take the config's plain fields, not derived constants: the constants
(c(bits), grid centre, trust radius) are computed on the host inside the op, cached, and
never traced.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from qat.config import QuantizerConfig, parse_bits
from qat.estimators import Quantized
from qat.hadamard import hadamard_transform
from qat.quantizer import triton_unsupported_reason
from kernels.plan import MAX_FUSED_BLOCK, interpreting, quant_scalars, rotation_block, tiling_for

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedQuantized(NamedTuple):
    """`Quantized` plus the per-row scale s (fp32, x's leading shape): what export needs."""

    value: Tensor
    codes: Tensor | None  # int32 grid indices, None unless requested
    grad_mask: Tensor
    scale: Tensor


@functools.cache
def _triton_kernels():
    # Imported on first use: triton decides interpreter vs compiled mode when the kernels
    # are defined, so TRITON_INTERPRET must be read then, not when `kernels` is imported.
    from kernels import hadamard_quant

    return hadamard_quant


@torch.library.custom_op("qat_kernels::quantize_rows", mutates_args=())
def quantize_rows(
    x: Tensor, block: int, bits: float, grid: str, estimator: str, trust: float | None, clip_scale: float, with_codes: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[M, K] -> (value, mask uint8 (empty for ste), scale fp32 [M], codes int32 (empty unless with_codes))."""
    sc = quant_scalars(parse_bits(bits), grid, estimator, trust, clip_scale)
    return _triton_kernels().quantize_rows(x.contiguous(), tiling_for(x.shape[1], block), sc, with_codes)


@quantize_rows.register_fake
def _quantize_rows_fake(x, block, bits, grid, estimator, trust, clip_scale, with_codes):
    m, k = x.shape
    mask = x.new_empty((m, k) if estimator != "ste" else (0,), dtype=torch.uint8)
    codes = x.new_empty((m, k) if with_codes else (0,), dtype=torch.int32)
    return x.new_empty((m, k)), mask, x.new_empty((m,), dtype=torch.float32), codes


@torch.library.custom_op("qat_kernels::masked_rotate", mutates_args=())
def masked_rotate(grad: Tensor, mask: Tensor, block: int) -> Tensor:
    """(grad ⊙ mask) @ blockdiag(H_block / sqrt(block)) for [M, K] grad; an empty mask means all ones."""
    return _triton_kernels().masked_rotate(grad.contiguous(), mask, tiling_for(grad.shape[1], block))


@masked_rotate.register_fake
def _masked_rotate_fake(grad, mask, block):
    return grad.new_empty(grad.shape)


def _setup_backward(ctx, inputs, output) -> None:
    ctx.block = inputs[1]
    ctx.mark_non_differentiable(*output[1:])  # mask, scale and codes carry no gradient
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_value: Tensor, *_unused: Tensor):
    (mask,) = ctx.saved_tensors
    return masked_rotate(grad_value, mask, ctx.block), None, None, None, None, None, None, None


quantize_rows.register_autograd(_backward, setup_context=_setup_backward)


def _check(x: Tensor, cfg: QuantizerConfig) -> None:
    if why := triton_unsupported_reason(cfg):
        raise ValueError(f"the fused Triton kernels do not support {why}; use backend='torch'")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused quantization of dtype {x.dtype} is not supported; use float32, bfloat16 or float16")
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        raise ValueError(f"the fused Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), got device {x.device}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fused quantization needs a non-empty last dim (the row), got shape {tuple(x.shape)}")


def fused_quantize_rows(x: Tensor, cfg: QuantizerConfig, *, with_codes: bool = True) -> FusedQuantized:
    """Fake-quantize x [..., K] row-wise in the rotated basis, with the per-row scale (see fused_quantize)."""
    _check(x, cfg)
    dim = x.shape[-1]
    block = rotation_block(cfg, dim)
    rows = x.reshape(-1, dim)
    if block > MAX_FUSED_BLOCK:
        # A block this long does not fit one program's registers: rotate first (same
        # function, same rounding to x's dtype as the torch path), quantize unrotated.
        rows, block = hadamard_transform(rows, block), 0
    value, mask, scale, codes = torch.ops.qat_kernels.quantize_rows(
        rows, block, float(cfg.bits), cfg.grid, cfg.estimator, cfg.trust, float(cfg.clip_scale), with_codes
    )
    if cfg.estimator == "ste":
        grad_mask = torch.ones((), dtype=torch.bool, device=x.device).expand(x.shape)  # no memory
    else:
        grad_mask = mask.view(torch.bool).view(x.shape)
    return FusedQuantized(value.view(x.shape), codes.view(x.shape) if with_codes else None, grad_mask, scale.view(x.shape[:-1]))


def fused_quantize(x: Tensor, cfg: QuantizerConfig, *, with_codes: bool = True) -> Quantized:
    """The fused equivalent of `Quantizer(cfg).forward` for configs where
    `triton_unsupported_reason(cfg) is None`.

    x: [..., K] float32 / bfloat16 / float16, on CUDA (or CPU under TRITON_INTERPRET=1).
    Returns Quantized(value, codes, grad_mask): value in x's shape and dtype, in the rotated
    basis, differentiable (d value / d x = H (g ⊙ mask)); codes int32 grid indices (None when
    with_codes=False, which skips writing them: training never reads codes); grad_mask bool.
    """
    value, codes, grad_mask, _ = fused_quantize_rows(x, cfg, with_codes=with_codes)
    return Quantized(value, codes, grad_mask)
