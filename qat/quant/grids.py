"""Quantization grids: level sets in units of the scale s, and rounding to them.

Every grid is a sorted set of unit levels spanning [-1, 1]; a row with scale s (the
half-range) is quantized to s * levels. Uniform grids round arithmetically (one formula
for "int" and "int_zero", which differ only in where the centre sits); non-uniform grids
("gaussian", "fp4") round by bucketing at the midpoints. Integer codes index the levels,
0 .. len(levels) - 1, so the fake-quant values are recoverable as s * levels[code].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qat.quant.bits import TERNARY_BITS, n_levels, parse_bits
from qat.quant.gaussian import fit_level_scale, gaussian_levels
from qat.quant.registry import registrar

# e2m1 magnitudes: 0, 0.5, 1, 1.5, 2, 3, 4, 6 (sign bit separate; +0 and -0 are one level).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class Grid:
    """A level set in units of s. `center` (steps from 0 to +-1) is set for uniform grids.

    gaussian_scale and default_trust are derived once here, so that a forward pass only
    reads constants (no cached-function calls that would break a torch.compile graph).
    """

    name: str
    levels: tuple[float, ...]
    center: float | None
    gaussian_scale: float = float("nan")  # c(bits): s / RMS minimising the MSE on N(0, 1)
    default_trust: float = float("nan")  # half the outermost step at that scale, in RMS units

    @property
    def uniform(self) -> bool:
        return self.center is not None

    @property
    def size(self) -> int:
        return len(self.levels)


# Each grid: its unit levels at a bit-width (ascending, spanning [-1, 1]) and its centre
# (steps from 0 to +-1) when uniform, else None. The keys are the allowed `grid` values.
GRIDS: dict[str, Callable[[int | float], tuple[tuple[float, ...], float | None]]] = {}
register_grid = registrar(GRIDS)


def _uniform(center: float) -> tuple[tuple[float, ...], float]:
    return tuple(((np.arange(2 * center + 1) - center) / center).tolist()), center


@register_grid("int")
def int_levels(bits: int | float) -> tuple[tuple[float, ...], float]:
    """n points spanning [-1, 1], +-(k + 1/2) * step for even n (QuEST's grid, no zero)."""
    return _uniform((n_levels(bits) - 1) / 2)


@register_grid("int_zero")
def int_zero_levels(bits: int | float) -> tuple[tuple[float, ...], float]:
    """Symmetric with zero: k * step with |k| <= floor((n - 1) / 2), e.g. [-7, 7] at 4 bits."""
    return _uniform(float((n_levels(bits) - 1) // 2))


@register_grid("gaussian")
def gaussian_grid_levels(bits: int | float) -> tuple[tuple[float, ...], None]:
    """Lloyd-Max levels of N(0, 1), divided by the outermost one."""
    raw = gaussian_levels(bits)
    return tuple((raw / raw[-1]).tolist()), None


@register_grid("fp4")
def fp4_levels(bits: int | float) -> tuple[tuple[float, ...], None]:
    """e2m1 values (+0 and -0 are one level), divided by 6."""
    raw = np.array(sorted({-v for v in _E2M1} | set(_E2M1)))
    return tuple((raw / raw[-1]).tolist()), None


def grid_bits_error(grid: str, bits: int | float) -> str | None:
    """Why `grid` cannot have `bits` (one phrase), or None. bits=16 means no grid and is fine."""
    if bits == 16:
        return None
    if grid == "fp4" and bits != 4:
        return f"bits={bits!r} is not allowed with grid='fp4'; fp4 (e2m1) has bits=4"
    if grid == "int_zero" and bits == 1:
        return f"bits=1 is not allowed with grid='int_zero'; a zero level needs at least 3 levels (bits >= {TERNARY_BITS})"
    return None


@functools.cache
def make_grid(bits: int | float, grid: str = "int") -> Grid:
    """The unit level set of `grid` at `bits`, with its MSE-optimal Gaussian scale and
    QuEST's default trust radius (half the outermost step at that scale, in RMS units)."""
    bits = parse_bits(bits)
    if grid not in GRIDS:
        raise ValueError(f"grid={grid!r} is not allowed; choose one of {', '.join(map(repr, GRIDS))}")
    if bits == 16 or (why := grid_bits_error(grid, bits)):
        raise ValueError(why or "bits=16 has no grid (no quantization)")
    levels, center = GRIDS[grid](bits)
    c = fit_level_scale(levels)
    return Grid(grid, levels, center, gaussian_scale=c, default_trust=c * (levels[-1] - levels[-2]) / 2)


def optimal_gaussian_scale(bits: int | float, grid: str = "int") -> float:
    """c(bits): the s/sigma minimising E[(X - Q(X))^2] for X ~ N(0, 1) on this grid.

    Derived numerically from closed-form cell integrals and a 1-D minimiser (cached). For
    1 bit on the int grid it is E|X| = sqrt(2/pi); for the Lloyd-Max grid it is its
    outermost level (those levels are already MSE-optimal).
    """
    return make_grid(bits, grid).gaussian_scale


def default_trust(bits: int | float, grid: str = "int") -> float:
    """QuEST's trust radius in RMS units: half the outermost grid step at the optimal scale."""
    return make_grid(bits, grid).default_trust


@functools.cache
def _levels_tensor(levels: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor(levels, dtype=dtype, device=device)
    return values, (values[1:] + values[:-1]) / 2


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level rounding of `x` (fp32 or fp64) to scale * grid.levels (values beyond +-scale clip).

    scale broadcasts against x (one per row or group). Returns (q, codes) with q in x's dtype and
    integer codes in [0, grid.size). Rounds half up, the same in the Triton kernels.
    """
    t = x / scale
    if grid.uniform:
        c = grid.center
        codes = torch.floor(t.clamp(-1.0, 1.0) * c + (c + 0.5))
        q = (codes - c) * (scale / c)
        return q, codes.to(torch.int32)
    values, midpoints = _levels_tensor(grid.levels, x.device, x.dtype)
    codes = torch.bucketize(t.contiguous(), midpoints)
    return values[codes] * scale, codes.to(torch.int32)
