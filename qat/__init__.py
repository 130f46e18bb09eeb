"""Quantization-aware training: QuEST (Hadamard + MSE-optimal scale + trust estimator) and baselines."""

from qat.config import QuantizerConfig, n_levels
from qat.convert import quantize_model, quantizers
from qat.estimators import ESTIMATORS, Quantized
from qat.gaussian import gaussian_levels, quantization_mse
from qat.grids import Grid, default_trust, make_grid, optimal_gaussian_scale, round_to_grid
from qat.hadamard import hadamard_matrix, hadamard_transform
from qat.linear import QuantLinear
from qat.quantizer import Quantizer

__all__ = [
    "ESTIMATORS",
    "Grid",
    "QuantLinear",
    "Quantized",
    "Quantizer",
    "QuantizerConfig",
    "default_trust",
    "gaussian_levels",
    "hadamard_matrix",
    "hadamard_transform",
    "make_grid",
    "n_levels",
    "optimal_gaussian_scale",
    "quantization_mse",
    "quantize_model",
    "quantizers",
    "round_to_grid",
]
