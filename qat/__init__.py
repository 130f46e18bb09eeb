"""Quantization-aware training: QuEST (Hadamard + MSE-optimal scale + trust estimator) and baselines.

Public names resolve lazily so that `import qat.scaling` (numpy/scipy only) and the CLI
scripts start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "QuantizerConfig": "qat.config",
    "n_levels": "qat.config",
    "quantize_model": "qat.convert",
    "quantizers": "qat.convert",
    "ESTIMATORS": "qat.estimators",
    "Quantized": "qat.estimators",
    "gaussian_levels": "qat.gaussian",
    "quantization_mse": "qat.gaussian",
    "Grid": "qat.grids",
    "default_trust": "qat.grids",
    "make_grid": "qat.grids",
    "optimal_gaussian_scale": "qat.grids",
    "round_to_grid": "qat.grids",
    "hadamard_matrix": "qat.hadamard",
    "hadamard_transform": "qat.hadamard",
    "QuantLinear": "qat.linear",
    "Quantizer": "qat.quantizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qat' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from qat.config import QuantizerConfig, n_levels
    from qat.convert import quantize_model, quantizers
    from qat.estimators import ESTIMATORS, Quantized
    from qat.gaussian import gaussian_levels, quantization_mse
    from qat.grids import Grid, default_trust, make_grid, optimal_gaussian_scale, round_to_grid
    from qat.hadamard import hadamard_matrix, hadamard_transform
    from qat.linear import QuantLinear
    from qat.quantizer import Quantizer
