"""Gradient estimators: how the backward pass treats the (non-differentiable) rounding.

Each estimator is a function (x, scale, rms, grid, knobs) -> Quantized, registered by name;
`knobs` carries the two numbers some of them read (the trust radius, the clip scale).
They all round with `round_to_grid`; they differ only in the backward:

- trust: pass the gradient where |q(x) - x| <= trust * RMS (QuEST); outliers and clipped
  values whose error exceeds the trust radius get zero gradient;
- ste: identity;
- clip: pass the gradient where |x| <= clip_scale * s;
- lsq: learnable scale with the LSQ step gradient (Esser et al.) and its gradient scale;
- pact: learnable clip; the input gets the straight-through gradient inside the clip
  range (QuEST's PACT class gives the input none) and the clip gets sign(x) outside.

The first three share one masked straight-through Function; the mask is the only thing
that differs. LSQ and PACT each need their own backward for the scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from qat.quant.grids import Grid, round_to_grid
from qat.quant.registry import registrar


class Quantized(NamedTuple):
    """One quantization call: the output (with the estimator's backward), integer codes
    (indices into the grid's levels), the boolean mask of elements whose gradient passes,
    and the scale s that was used (broadcastable against the grouped input; None where a
    caller did not ask for it); for an asymmetric quantizer the offset m too, the value of
    code 0 (then value = code * s / center + m)."""

    value: torch.Tensor
    codes: torch.Tensor | None
    grad_mask: torch.Tensor | None  # None: computed without a gradient (fake_quantize with_gradient=False)
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None


class EstimatorKnobs(NamedTuple):
    """The numbers an estimator may read: trust radius (in RMS units) and clip scale."""

    trust: float
    clip_scale: float


Estimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Grid, EstimatorKnobs], Quantized]
ESTIMATORS: dict[str, Estimator] = {}


register_estimator = registrar(ESTIMATORS)


class MaskedStraightThrough(torch.autograd.Function):
    """Forward: q. Backward: grad * mask (the straight-through estimator restricted to mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


@register_estimator("trust")
def trust_estimator(x: torch.Tensor, scale: torch.Tensor, rms: torch.Tensor, grid: Grid, knobs: EstimatorKnobs) -> Quantized:
    q, codes = round_to_grid(x.detach(), scale, grid)
    mask = (q - x.detach()).abs() <= knobs.trust * rms
    return Quantized(MaskedStraightThrough.apply(x, q, mask), codes, mask)


@register_estimator("ste")
def ste_estimator(x: torch.Tensor, scale: torch.Tensor, rms: torch.Tensor, grid: Grid, knobs: EstimatorKnobs) -> Quantized:
    q, codes = round_to_grid(x.detach(), scale, grid)
    mask = torch.ones_like(x, dtype=torch.bool)
    return Quantized(MaskedStraightThrough.apply(x, q, mask), codes, mask)


@register_estimator("clip")
def clip_estimator(x: torch.Tensor, scale: torch.Tensor, rms: torch.Tensor, grid: Grid, knobs: EstimatorKnobs) -> Quantized:
    q, codes = round_to_grid(x.detach(), scale, grid)
    mask = x.detach().abs() <= knobs.clip_scale * scale
    return Quantized(MaskedStraightThrough.apply(x, q, mask), codes, mask)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the scale's shape."""
    return grad.sum_to_size(shape) if shape else grad.sum()


class LSQFunction(torch.autograd.Function):
    """LSQ: round straight-through, zero input gradient outside the clip range, and
    d q / d s = q/s - x/s inside, q/s (= +-1) outside, times the LSQ gradient scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, grid: Grid, grad_scale: float):
        s = scale.detach()
        q, codes = round_to_grid(x, s, grid)
        inside = x.abs() <= s
        ctx.save_for_backward(x, q, s, inside)
        ctx.grad_scale, ctx.scale_shape = grad_scale, scale.shape
        ctx.mark_non_differentiable(codes, inside)
        return q, codes, inside

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):
        x, q, s, inside = ctx.saved_tensors
        dq_ds = (q - torch.where(inside, x, 0.0)) / s
        grad_s = _reduce_to(grad * dq_ds, ctx.scale_shape) * ctx.grad_scale
        return grad * inside, grad_s, None, None


class PACTFunction(torch.autograd.Function):
    """PACT with a symmetric learnable clip s: straight-through inside [-s, s], zero
    outside; the clip gets d clamp(x, -s, s) / d s = sign(x) where |x| > s."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, grid: Grid):
        s = scale.detach()
        q, codes = round_to_grid(x, s, grid)
        inside = x.abs() <= s
        ctx.save_for_backward(x, inside)
        ctx.scale_shape = scale.shape
        ctx.mark_non_differentiable(codes, inside)
        return q, codes, inside

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):
        x, inside = ctx.saved_tensors
        grad_s = _reduce_to(torch.where(inside, 0.0, grad * torch.sign(x)), ctx.scale_shape)
        return grad * inside, grad_s, None


class LearnedRange(torch.autograd.Function):
    """A stored per-row / per-group scale that is trained (scale_update="learned", range
    learning): the value and the input's gradient stay what the estimator made them, and the
    scale gets LSQ's step gradient d q / d s = (q - x) / s inside the range, q / s outside,
    times LSQ's gradient scale. The trust, ste and clip estimators give the scale none."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, grad_scale: float):
        ctx.save_for_backward(x, q, scale)
        ctx.grad_scale = grad_scale
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, q, s = ctx.saved_tensors
        dq_ds = (q - torch.where(x.abs() <= s, x, 0.0)) / s
        return grad, None, None, _reduce_to(grad * dq_ds, s.shape) * ctx.grad_scale, None


def lsq_grad_scale(numel_per_scale: int, grid: Grid) -> float:
    """LSQ's 1/sqrt(N * Q_p), with Q_p the number of steps from zero to the clip."""
    q_p = grid.center if grid.uniform else (grid.size - 1) / 2
    return 1.0 / math.sqrt(numel_per_scale * q_p)


@register_estimator("lsq")
def lsq_estimator(x: torch.Tensor, scale: torch.Tensor, rms: torch.Tensor, grid: Grid, knobs: EstimatorKnobs) -> Quantized:
    numel_per_scale = x.numel() // max(scale.numel(), 1)
    q, codes, inside = LSQFunction.apply(x, scale, grid, lsq_grad_scale(numel_per_scale, grid))
    return Quantized(q, codes, inside)


@register_estimator("pact")
def pact_estimator(x: torch.Tensor, scale: torch.Tensor, rms: torch.Tensor, grid: Grid, knobs: EstimatorKnobs) -> Quantized:
    q, codes, inside = PACTFunction.apply(x, scale, grid)
    return Quantized(q, codes, inside)
