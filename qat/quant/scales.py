"""Scale fits: the half-range s of each row (or group), computed without gradient.

The learnable "lsq" scale is a parameter of `Quantizer`, initialised from `fit_scale_mse`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qat.quant.grids import Grid, round_to_grid
from qat.quant.registry import registrar

_TINY = 1e-12  # keeps all-zero rows finite (they quantize to the smallest levels, times ~0)
MSE_SEARCH_POINTS = 100

ScaleFit = Callable[[torch.Tensor, torch.Tensor, Grid], torch.Tensor]
SCALE_FITS: dict[str, ScaleFit] = {}


register_scale = registrar(SCALE_FITS)


def round_scale(scale: torch.Tensor, grid: Grid, scale_dtype: str) -> torch.Tensor:
    """The scale whose unit step (scale / center on a uniform grid) is a `scale_dtype` number.
    Multiplying back is exact: a float16 step times the center (7 for Q4_0's int_zero grid,
    127 for Q8_0's) needs at most 18 significant bits, and dividing by the center returns the
    step exactly. A step below float16's smallest normal (an all-zero group) becomes that
    number, not 0: a zero scale would divide 0 by 0."""
    if scale_dtype == "float32":
        return scale
    unit = grid.center if grid.uniform else 1.0
    step = (scale / unit).to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    return step.to(scale.dtype) * unit


def fit_offset_grid(x: torch.Tensor, grid: Grid, scale: str, scale_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric ("int" grid) fit per row of x [..., g]: (step d, offset m), levels c * d + m
    for c = 0 .. n - 1. "rms_mse" centres the grid on the row mean with half-range c(bits) times
    the centred RMS (MSE-optimal for a Gaussian row about any mean), m = mean - center * d;
    "absmax" is llama.cpp's Q4_1 rule, d = (max - min) / (n - 1) and m = min. With scale_dtype
    float16 d and m are rounded to float16 numbers (d first), so c * d + m is exact in float32
    up to its one rounding, as llama.cpp computes it."""
    if scale == "absmax":
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        step = ((hi - lo) / (2 * grid.center)).clamp_min(_TINY)
    else:
        middle = x.mean(dim=-1, keepdim=True)
        step = (grid.gaussian_scale * row_rms(x - middle) / grid.center).clamp_min(_TINY)
    if scale_dtype == "float16":
        step = step.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).to(x.dtype)
    offset = lo if scale == "absmax" else middle - grid.center * step
    if scale_dtype == "float16":
        biggest = torch.finfo(torch.float16).max
        offset = offset.clamp(-biggest, biggest).to(torch.float16).to(x.dtype)
    return step, offset


def row_rms(x: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(x^2)) over the last dim (not mean-centred, as QuEST), clamped away from 0."""
    return x.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(_TINY)


@register_scale("rms_mse")
def fit_scale_mse(x: torch.Tensor, rms: torch.Tensor, grid: Grid) -> torch.Tensor:
    """c(bits) * RMS: MSE-optimal if the row is Gaussian (which the Hadamard rotation makes it)."""
    return grid.gaussian_scale * rms


@register_scale("absmax")
def fit_scale_absmax(x: torch.Tensor, rms: torch.Tensor, grid: Grid) -> torch.Tensor:
    return x.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)


@register_scale("mse_search")
def fit_scale_search(x: torch.Tensor, rms: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per row, the clip ratio r * absmax (r on a 1/MSE_SEARCH_POINTS grid, plus the
    Gaussian optimum) with the smallest actual squared error."""
    absmax = fit_scale_absmax(x, rms, grid)
    best_scale = fit_scale_mse(x, rms, grid)
    best_err = (round_to_grid(x, best_scale, grid)[0] - x).square().sum(-1, keepdim=True)
    for i in range(1, MSE_SEARCH_POINTS + 1):
        scale = absmax * (i / MSE_SEARCH_POINTS)
        err = (round_to_grid(x, scale, grid)[0] - x).square().sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale
