"""The bridge from a quantizer config to the fused Triton kernels.

`kernels/` knows nothing of configs or grids; this file derives what the kernels take
(the resolved Hadamard block, and the constants c(bits), grid centre, trust radius, clip)
from the same config and grid that `fake_quantize` uses, so a kernel that matches
`fake_quantize` matches training. Blocks longer than the kernel's register tile, and blocks
that are not powers of two (1536 = 12 * 128: H_12 ⊗ H_128), are rotated here first, by the
same `hadamard_transform` as the torch path.
"""

from __future__ import annotations

import torch

from qat.kernels.ops import fused_quantize_rows
from qat.kernels.plan import QuantScalars
from qat.kernels.support import kernel_rotates, unsupported_config_reason, use_triton
from qat.quant.config import QuantizerConfig
from qat.quant.estimators import Quantized
from qat.quant.grids import Grid
from qat.quant.hadamard import check_block, hadamard_transform


def fused_unsupported_reason(cfg: QuantizerConfig) -> str | None:
    """None when the fused kernels cover this config, else why not (asked once per quantizer)."""
    if cfg.enabled and cfg.scale_dtype != "float32":
        return f"scale_dtype={cfg.scale_dtype!r}"
    if cfg.enabled and cfg.asymmetric:
        return "asymmetric=true"
    if cfg.holds_scale:
        return f"scale_update={cfg.scale_update!r}"
    return unsupported_config_reason(
        enabled=cfg.enabled, grid=cfg.grid, scale=cfg.scale, estimator=cfg.estimator, granularity=cfg.granularity, sparsity=cfg.sparsity
    )


def use_fused(cfg: QuantizerConfig, unsupported: str | None, x: torch.Tensor) -> bool:
    """The backend decision for one call (the config part, `unsupported`, decided earlier)."""
    return use_triton(cfg.backend, unsupported, x)


def kernel_scalars(cfg: QuantizerConfig, grid: Grid) -> QuantScalars:
    return QuantScalars(
        scale_factor=grid.gaussian_scale, center=float(grid.center), trust=float(cfg.trust_radius(grid)),
        clip=float(cfg.clip_scale), estimator=cfg.estimator,
    )  # fmt: skip


def fused_fake_quantize(x: torch.Tensor, cfg: QuantizerConfig, grid: Grid, *, with_codes: bool = True) -> Quantized:
    """`fake_quantize(x, cfg, grid)` through the fused kernels (configs where
    `fused_unsupported_reason(cfg)` is None). scale comes back as [..., 1], like the torch path."""
    if why := fused_unsupported_reason(cfg):
        raise ValueError(f"the fused Triton kernels do not support {why}; use backend='torch'")
    block = 0
    if cfg.rotation == "hadamard":
        block = cfg.block_for(x.shape[-1])
        check_block(x.shape[-1], block)
        if not kernel_rotates(block):
            # Too long for one program's registers, or not a power of two (the kernel builds
            # Sylvester blocks only; H_m ⊗ H_p is hadamard.py's dense-times-butterfly): rotate
            # first with the torch path's own function (same rounding to x's dtype, autograd
            # through it), then the kernel quantizes unrotated. Triton and torch then agree.
            x, block = hadamard_transform(x, block), 0
    qz = fused_quantize_rows(x, block, kernel_scalars(cfg, grid), with_codes=with_codes)
    return Quantized(qz.value, qz.codes, qz.grad_mask, qz.scale.unsqueeze(-1))
