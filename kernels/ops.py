"""torch wiring of the fused kernels: two custom ops, their autograd formula, `fused_quantize_rows`.

The kernels are wrapped in `torch.library.custom_op`s with fake (meta) implementations, so
`torch.compile` traces through `fused_quantize` without graph breaks and treats each kernel
as one opaque node; `register_autograd` attaches the backward (itself a custom op, so the
compiled backward graph holds it too):

    value = quantize_rows(x)            d value / d x = H^T (g ⊙ mask) = H (g ⊙ mask)

which is what autograd gives through `hadamard_transform` + `MaskedStraightThrough` on the
torch path. The ops take plain scalars (c(bits), grid centre, trust radius, clip), derived
once by the caller on the host and never traced.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from qat.kernels.plan import MAX_FUSED_BLOCK, QuantScalars, tiling_for
from qat.kernels.support import use_triton


class FusedQuantized(NamedTuple):
    """One fused quantization: value, codes, gradient mask and the per-row scale s (fp32)."""

    value: Tensor
    codes: Tensor | None  # int32 grid indices, None unless requested
    grad_mask: Tensor
    scale: Tensor


@functools.cache
def _triton_kernels():
    # Imported on first use: triton decides interpreter vs compiled mode when the kernels
    # are defined, so TRITON_INTERPRET must be read then, not when `kernels` is imported.
    from qat.kernels import hadamard_quant

    return hadamard_quant


@torch.library.custom_op("qat_kernels::quantize_rows", mutates_args=())
def quantize_rows(
    x: Tensor, block: int, scale_factor: float, center: float, trust: float, clip: float, estimator: str, with_codes: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[M, K] -> (value, mask uint8 (empty for ste), scale fp32 [M], codes int32 (empty unless with_codes))."""
    sc = QuantScalars(scale_factor, center, trust, clip, estimator)
    return _triton_kernels().quantize_rows(x.contiguous(), tiling_for(x.shape[1], block), sc, with_codes)


@quantize_rows.register_fake
def _quantize_rows_fake(x, block, scale_factor, center, trust, clip, estimator, with_codes):
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


def fused_quantize_rows(x: Tensor, block: int, scalars: QuantScalars, *, with_codes: bool = True) -> FusedQuantized:
    """Fake-quantize x [..., K] row-wise: rotate by Hadamard blocks of `block` along K (0 = none;
    the caller has resolved and validated it, and rotates blocks above MAX_FUSED_BLOCK itself),
    RMS scale, round, and the estimator's gradient mask, in one pass over memory.

    x: float32 / bfloat16 / float16 on CUDA (or CPU under TRITON_INTERPRET=1).
    Returns value in x's shape and dtype, in the rotated basis, differentiable (d value / d x =
    H (g ⊙ mask)); codes int32 grid indices (None when with_codes=False, which skips writing
    them: training never reads codes); grad_mask bool; the per-row scale fp32 (x's leading shape).
    """
    use_triton("triton", None, x)  # one-line error for a dtype or device the kernels cannot take
    if block > MAX_FUSED_BLOCK:
        raise ValueError(f"Hadamard block {block} exceeds the fused kernel's {MAX_FUSED_BLOCK}; rotate beforehand and pass block=0")
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)
    sc = scalars
    value, mask, scale, codes = torch.ops.qat_kernels.quantize_rows(
        rows, block, sc.scale_factor, sc.center, sc.trust, sc.clip, sc.estimator, with_codes
    )
    if sc.estimator == "ste":
        grad_mask = torch.ones((), dtype=torch.bool, device=x.device).expand(x.shape)  # no memory
    else:
        grad_mask = mask.view(torch.bool).view(x.shape)
    return FusedQuantized(value.view(x.shape), codes.view(x.shape) if with_codes else None, grad_mask, scale.view(x.shape[:-1]))
