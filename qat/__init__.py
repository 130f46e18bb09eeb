"""Quantization-aware training: QuEST (Hadamard + MSE-optimal scale + trust estimator) and baselines.

Public names resolve lazily so that `import qat.scaling.law` (numpy/scipy only) and the CLI
scripts start without importing torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# The kernels and the plain model live in the checkout's top-level folders kernels/ and models/
# and are imported as `qat.kernels` and `qat.models`: a top-level `kernels` is Hugging Face's
# package (a dependency of transformers >= 5.25) and `models` is too generic to own. Neither
# folder has an __init__.py, so a checkout on sys.path (`python train.py`, pytest from the root)
# never shadows another distribution's package of that name: a regular package always wins over
# a namespace portion. A wheel installs the two folders inside qat/ (pyproject's package-dir);
# in a checkout, and in an editable install of it, they are found beside this package.
if not os.path.isdir(os.path.join(__path__[0], "kernels")):
    __path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_EXPORTS = {
    "QuantizerConfig": "qat.quant.config",
    "n_levels": "qat.quant.bits",
    "fake_quantize": "qat.quant.quantizer",
    "quantize_model": "qat.quant.convert",
    "quantizers": "qat.quant.convert",
    "ESTIMATORS": "qat.quant.estimators",
    "Quantized": "qat.quant.estimators",
    "gaussian_levels": "qat.quant.gaussian",
    "quantization_mse": "qat.quant.gaussian",
    "Grid": "qat.quant.grids",
    "default_trust": "qat.quant.grids",
    "make_grid": "qat.quant.grids",
    "optimal_gaussian_scale": "qat.quant.grids",
    "round_to_grid": "qat.quant.grids",
    "hadamard_matrix": "qat.quant.hadamard",
    "hadamard_transform": "qat.quant.hadamard",
    "QuantLinear": "qat.quant.linear",
    "Quantizer": "qat.quant.quantizer",
    "export_packed": "qat.packed.export",
    "KVCache": "qat.models.kv_cache",
    "Llama": "qat.models.llama",
    "LlamaConfig": "qat.models.llama",
    "MODEL_SIZES": "qat.models.sizes",
    "llama_config": "qat.models.sizes",
    "load_packed": "qat.packed.load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qat' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from qat.quant.bits import n_levels
    from qat.quant.config import QuantizerConfig
    from qat.quant.convert import quantize_model, quantizers
    from qat.quant.estimators import ESTIMATORS, Quantized
    from qat.quant.gaussian import gaussian_levels, quantization_mse
    from qat.quant.grids import Grid, default_trust, make_grid, optimal_gaussian_scale, round_to_grid
    from qat.quant.hadamard import hadamard_matrix, hadamard_transform
    from qat.quant.linear import QuantLinear
    from qat.models.kv_cache import KVCache
    from qat.models.llama import Llama, LlamaConfig
    from qat.models.sizes import MODEL_SIZES, llama_config
    from qat.packed.export import export_packed
    from qat.packed.load import load_packed
    from qat.quant.quantizer import Quantizer, fake_quantize
