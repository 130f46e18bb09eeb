"""The PyTorch reference of the fused kernels, composed from the qat functions.

It is the torch path of `qat.Quantizer.forward` for the configurations the kernels cover
(rotation -> row RMS -> c(bits) * RMS -> round_to_grid -> estimator mask), returning the
per-row scale as well. Nothing is re-derived here: every step is the library's own
function, so a kernel that matches this matches the training path.
"""

from __future__ import annotations

import torch

from qat.config import QuantizerConfig
from qat.estimators import ESTIMATORS
from qat.grids import make_grid
from qat.hadamard import hadamard_transform
from qat.scales import fit_scale_mse, row_rms
from kernels.ops import FusedQuantized


def reference_rotate(x: torch.Tensor, cfg: QuantizerConfig) -> torch.Tensor:
    """The rotated tensor the torch path quantizes (x's dtype, as `hadamard_transform` returns)."""
    return hadamard_transform(x, cfg.hadamard_block) if cfg.rotation == "hadamard" else x


def reference_quantize(x: torch.Tensor, cfg: QuantizerConfig) -> FusedQuantized:
    """Row-wise fake quantization of x [..., K] through the qat functions, differentiable like the
    torch path (value in x's dtype, codes int32, grad_mask bool, scale fp32 [...])."""
    if cfg.scale != "rms_mse" or cfg.granularity != "row" or cfg.sparsity != "none" or not cfg.enabled:
        raise ValueError(f"the reference covers the fused configurations only (rms_mse, row, no sparsity), got {cfg}")
    rotated = reference_rotate(x, cfg)
    # fp32 math for half inputs, exactly as Quantizer.forward does.
    xf = rotated if rotated.dtype == torch.float32 else rotated.float()
    grid = make_grid(cfg.bits, cfg.grid)
    with torch.no_grad():
        rms = row_rms(xf)
    scale = fit_scale_mse(xf.detach(), rms, grid)
    qz = ESTIMATORS[cfg.estimator](xf, scale, rms, grid, cfg)
    return FusedQuantized(qz.value.to(x.dtype), qz.codes, qz.grad_mask, scale.squeeze(-1))
