import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import ndtri

from qat.quant.bits import n_levels
from qat.quant.gaussian import gaussian_levels, quantization_mse
from qat.quant.grids import default_trust, make_grid, optimal_gaussian_scale

ALL_BITS = [1, 1.58, 2, 3, 4, 5, 6, 7, 8]


def _stratified_normal(n: int, seed: int) -> np.ndarray:
    """n N(0,1) samples, one per equal-probability stratum (Monte Carlo with low variance)."""
    u = (np.arange(n) + np.random.default_rng(seed).random(n)) / n
    return ndtri(u)


def _monte_carlo_argmin(unit_levels, samples):
    """Brute force: minimise the empirical MSE of the samples over the scale."""
    u = np.asarray(unit_levels)
    mids = (u[1:] + u[:-1]) / 2

    def mse(a):
        q = a * u[np.searchsorted(a * mids, samples)]
        return np.mean((samples - q) ** 2)

    scan = np.linspace(0.3, 6.0, 58)
    best = scan[np.argmin([mse(a) for a in scan])]
    return minimize_scalar(mse, bounds=(best - 0.2, best + 0.2), method="bounded", options={"xatol": 1e-5}).x


def test_one_bit_closed_form():
    assert abs(optimal_gaussian_scale(1) - math.sqrt(2 / math.pi)) < 1e-6
    # MSE(a) = 1 - 2 a E|X| + a^2 at the optimum a = E|X| is 1 - 2/pi
    assert abs(quantization_mse(np.array([-1, 1]) * math.sqrt(2 / math.pi)) - (1 - 2 / math.pi)) < 1e-12


@pytest.mark.parametrize("grid,bits", [("int", 1), ("int", 2), ("int", 3), ("int", 4), ("int", 8), ("int_zero", 1.58), ("int_zero", 4)])
def test_scales_match_monte_carlo_minimiser(bits, grid):
    samples = _stratified_normal(1_000_000, seed=0)
    brute = _monte_carlo_argmin(make_grid(bits, grid).levels, samples)
    assert abs(optimal_gaussian_scale(bits, grid) - brute) < 1e-2


def test_closed_form_mse_matches_monte_carlo():
    samples = _stratified_normal(1_000_000, seed=1)
    for bits in (2, 4):
        levels = optimal_gaussian_scale(bits) * np.asarray(make_grid(bits).levels)
        mids = (levels[1:] + levels[:-1]) / 2
        mc = np.mean((samples - levels[np.searchsorted(mids, samples)]) ** 2)
        assert abs(mc / quantization_mse(levels) - 1) < 5e-3


def test_optimum_is_a_minimum_on_a_scan():
    for bits in ALL_BITS:
        u = np.asarray(make_grid(bits).levels)
        c = optimal_gaussian_scale(bits)
        scan = [quantization_mse(a * u) for a in np.linspace(0.2, 6, 2000)]
        assert quantization_mse(c * u) <= min(scan) + 1e-12


@pytest.mark.parametrize("bits", ALL_BITS)
def test_lloyd_max_is_a_fixed_point_and_beats_uniform(bits):
    levels = gaussian_levels(bits)
    assert len(levels) == n_levels(bits)
    assert np.allclose(levels, -levels[::-1], atol=1e-13)
    # stationarity: nudging any level does not lower the MSE
    base = quantization_mse(levels)
    for i in range(len(levels)):
        for eps in (1e-4, -1e-4):
            moved = levels.copy()
            moved[i] += eps
            assert quantization_mse(moved) >= base - 1e-13
    u = np.asarray(make_grid(bits).levels) * optimal_gaussian_scale(bits)
    assert base <= quantization_mse(u) + 1e-15


def test_lloyd_max_known_values():
    # Max (1960): 2-bit levels +-0.4528, +-1.5104; converged 4-bit outermost 2.7326
    assert np.allclose(gaussian_levels(2)[2:], [0.4528, 1.5104], atol=1e-4)
    assert abs(gaussian_levels(4)[-1] - 2.7326) < 1e-4
    # the Lloyd-Max grid is already MSE-optimal, so its optimal scale is its outer level
    assert abs(optimal_gaussian_scale(4, "gaussian") - gaussian_levels(4)[-1]) < 1e-5


def test_default_trust_is_half_a_step():
    for bits in (1, 2, 4, 8):
        assert math.isclose(default_trust(bits), optimal_gaussian_scale(bits) / (2**bits - 1), rel_tol=1e-12)
    assert math.isclose(default_trust(4, "int_zero"), optimal_gaussian_scale(4, "int_zero") / 7 / 2)
    # fp4: half the gap between the two top e2m1 values (4 and 6) at the optimal scale
    assert math.isclose(default_trust(4, "fp4"), optimal_gaussian_scale(4, "fp4") / 6)
