"""Quantizing a standard normal: closed-form MSE, Lloyd-Max levels, MSE-optimal scales.

After a Hadamard rotation the rows are close to Gaussian, so the scale that minimises
E[(X - Q(X))^2] for X ~ N(0, 1) is the right one to multiply the row RMS by. Everything is
derived numerically here (nothing pasted from a table) and cached.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.optimize import minimize_scalar, root
from scipy.special import ndtr, ndtri

from qat.quant.bits import n_levels

_SQRT_2PI = np.sqrt(2.0 * np.pi)


_EDGE = 40.0  # stands in for infinity: pdf and 1 - cdf underflow to exactly 0 there


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / _SQRT_2PI


def _cells(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edges of each level's nearest-rounding cell."""
    edges = np.concatenate(([-_EDGE], (levels[1:] + levels[:-1]) / 2, [_EDGE]))
    return edges[:-1], edges[1:]


def _cell_prob(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    # Upper-tail cells use the survival function: 1 - cdf cancels catastrophically there.
    return np.where(lo >= 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))


def _centroids(levels: np.ndarray) -> np.ndarray:
    """E[X | X in cell i] for each level's cell."""
    lo, hi = _cells(levels)
    return (_pdf(lo) - _pdf(hi)) / _cell_prob(lo, hi)


def quantization_mse(levels: np.ndarray) -> float:
    """E[(X - Q(X))^2] for X ~ N(0,1) and nearest-level rounding to sorted `levels`.

    Cell i spans the midpoints (q_i, q_{i+1}) around level c_i; with P, M1, M2 the cell's
    probability, first and second moments, its contribution is M2 - 2 c M1 + c^2 P.
    """
    c = np.asarray(levels, dtype=np.float64)
    lo, hi = _cells(c)
    p = _cell_prob(lo, hi)
    m1 = _pdf(lo) - _pdf(hi)
    m2 = p + lo * _pdf(lo) - hi * _pdf(hi)
    return float(np.sum(m2 - 2 * c * m1 + c * c * p))


def fit_level_scale(unit_levels: tuple[float, ...]) -> float:
    """The a minimising quantization_mse(a * unit_levels) (unit levels span [-1, 1])."""
    return _fit_level_scale(tuple(float(u) for u in unit_levels))


@functools.cache
def _fit_level_scale(unit_levels: tuple[float, ...]) -> float:
    u = np.asarray(unit_levels)
    mse = lambda a: quantization_mse(a * u)  # noqa: E731
    # The MSE is unimodal in a on this bracket for every grid we ship (checked in tests
    # against a brute-force scan); the outermost level sits below 5 sigma even at 8 bits.
    res = minimize_scalar(mse, bounds=(1e-3, 8.0), method="bounded", options={"xatol": 1e-12, "maxiter": 1000})
    return float(res.x)


@functools.cache
def _lloyd_max(count: int, tol: float = 1e-12) -> tuple[float, ...]:
    # The Lloyd-Max conditions: every level is the centroid of its cell (cells split at
    # midpoints). Plain Lloyd iterations converge linearly with a rate that degrades like
    # 1 - O(1/n^2), so QuEST's 20 iterations leave even the 4-bit grid unconverged. We take
    # Lloyd steps from the companding start (quantiles of N(0, 3), near-optimal for large
    # n) and finish with a root solve of levels = centroids on the positive half (the
    # optimum is symmetric), then verify the fixed point to `tol`.
    if count == 1:
        return (0.0,)
    levels = np.sqrt(3.0) * ndtri((np.arange(count) + 0.5) / count)
    for _ in range(200):
        levels = _centroids(levels)
        levels = (levels - levels[::-1]) / 2
    half = count // 2

    def full(pos: np.ndarray) -> np.ndarray:
        middle = [0.0] if count % 2 else []
        return np.concatenate((-pos[::-1], middle, pos))

    residual = lambda pos: _centroids(full(pos))[-half:] - pos  # noqa: E731
    pos = root(residual, levels[-half:], method="hybr", options={"xtol": 1e-15}).x
    levels = full(np.sort(pos))
    err = np.max(np.abs(_centroids(levels) - levels))
    if not err < tol:
        raise RuntimeError(f"Lloyd-Max did not converge for {count} levels (residual {err:.2e})")
    return tuple(levels.tolist())


def gaussian_levels(bits: int | float) -> np.ndarray:
    """Lloyd-Max (MSE-optimal) levels for N(0, 1) with 2**bits levels (3 for 1.58), in sigma units."""
    return np.array(_lloyd_max(n_levels(bits)))
