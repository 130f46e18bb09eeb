"""The fake quantizer: `fake_quantize` (a pure function) and `Quantizer` (its module).

fake_quantize(x) returns the fake-quantized tensor in the ROTATED basis (QuEST's "half
Hadamard"): a linear layer rotates both operands along the reduction dim, so no inverse
rotation is ever needed. The composition is data-driven: each config field selects a
small registered function; there is no class per combination.

`fake_quantize` is the torch path and the reference of everything else: `Quantizer` calls
it, the fused Triton kernels are tested against it, telemetry and export read its codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qat.quant.config import QuantizerConfig
from qat.quant.estimators import ESTIMATORS, EstimatorKnobs, MaskedStraightThrough, Quantized
from qat.quant.fused import fused_fake_quantize, fused_unsupported_reason, use_fused
from qat.quant.grids import Grid, make_grid, round_to_grid
from qat.quant.hadamard import hadamard_transform
from qat.quant.scales import SCALE_FITS, fit_offset_grid, round_scale, row_rms
from qat.quant.sparsity import two_of_four_mask


def grouped(x: torch.Tensor, granularity: int | str) -> torch.Tensor:
    """View [..., K] as [..., K/g, g] so that the last dim holds one scale's elements."""
    if granularity == "row":
        return x
    if x.shape[-1] % granularity:
        raise ValueError(f"granularity={granularity} does not divide the last dim {x.shape[-1]}")
    return x.unflatten(-1, (-1, granularity))


def rotate(x: torch.Tensor, cfg: QuantizerConfig) -> torch.Tensor:
    """The rotated tensor that the quantizer rounds (x's dtype)."""
    return hadamard_transform(x, cfg.hadamard_block) if cfg.rotation == "hadamard" else x


def quantizer_grid(cfg: QuantizerConfig) -> Grid | None:
    return make_grid(cfg.bits, cfg.grid) if cfg.enabled else None


def fake_quantize(
    x: torch.Tensor, cfg: QuantizerConfig, grid: Grid | None = None, scale: torch.Tensor | None = None, *, with_gradient: bool = True
) -> Quantized:
    """rotation -> (2:4 mask) -> scale fit -> grid rounding, with the estimator's backward.

    x: [..., K]. grid: make_grid(cfg.bits, cfg.grid), passed by callers that hold it (a
    forward pass must not call cached functions under torch.compile). scale: a learned scale
    (LSQ / PACT) in place of the fitted one. Returns Quantized(value in x's shape and dtype,
    codes int32 (x's shape, None at 16 bits), grad_mask bool (x's shape), scale fp32 or fp64
    [..., 1] per row or [..., K/g, 1] per group).
    with_gradient=False (a forward that takes no gradient, e.g. decoding): the same value,
    bit for bit, without the estimator (grad_mask is None); the trust, ste and clip estimators'
    forward is the plain rounding. LSQ and PACT always run their estimator.
    """
    x = rotate(x, cfg)
    keep = two_of_four_mask(x) if cfg.sparsity == "2:4" else None
    if not cfg.enabled:
        value = x if keep is None else x * keep
        mask = torch.ones((), dtype=torch.bool, device=x.device).expand(x.shape) if keep is None else keep
        return Quantized(value, None, mask, None)
    grid = grid if grid is not None else make_grid(cfg.bits, cfg.grid)
    # fp32 math for half inputs (codes must not depend on bf16 rounding); fp64 stays fp64.
    xg = grouped(x if x.dtype in (torch.float32, torch.float64) else x.float(), cfg.granularity)
    rounding_only = not with_gradient and cfg.estimator in ROUNDING_FORWARD
    if cfg.asymmetric:
        return _offset_quantize(x, xg, cfg, grid, keep, rounding_only)
    with torch.no_grad():
        rms = row_rms(xg)
    if scale is None:
        if cfg.learnable_scale:
            raise ValueError("scale='lsq' is learned: pass the quantizer's scale (Quantizer.learned_scale)")
        scale = round_scale(SCALE_FITS[cfg.scale](xg.detach(), rms, grid), grid, cfg.scale_dtype)
    if rounding_only:
        qz = Quantized(*round_to_grid(xg.detach(), scale, grid), None)
    else:
        qz = ESTIMATORS[cfg.estimator](xg, scale, trust_unit(cfg, grid, scale, rms), grid, EstimatorKnobs(cfg.trust_radius(grid), cfg.clip_scale))
    return _finish(x, xg, qz, keep, scale.detach())


def trust_unit(cfg: QuantizerConfig, grid: Grid, scale: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """What the trust radius is a multiple of. QuEST's default radius is half the outermost grid
    step at the Gaussian-optimal scale c * RMS, in RMS units. Under another scale fit (absmax,
    mse_search) the grid's steps are that scale's, so the default radius follows it:
    default_trust * s / c is half the outermost step at the scale s actually used. Without that,
    a group-absmax scale (steps wider than c * RMS's) masked ordinary elements near a rounding
    midpoint, and training with a rotation diverged (docs/results.md). An explicit `trust` stays
    in RMS units; at the rms_mse scale the unit is RMS itself, bit for bit as before."""
    if cfg.trust is not None or cfg.scale == "rms_mse":
        return rms
    return scale.detach() / grid.gaussian_scale


# Estimators whose forward value is round_to_grid's (a masked straight-through backward).
ROUNDING_FORWARD = ("trust", "ste", "clip")


def _finish(x: torch.Tensor, xg: torch.Tensor, qz: Quantized, keep: torch.Tensor | None, scale: torch.Tensor, offset: torch.Tensor | None = None) -> Quantized:
    """Back to x's shape and dtype; pruned entries exactly zero, with no gradient."""
    value, codes = qz.value.reshape(x.shape), qz.codes.reshape(x.shape)
    mask = None if qz.grad_mask is None else qz.grad_mask.reshape(x.shape)
    if keep is not None:
        value, mask = value * keep, None if mask is None else mask & keep
    shape = (*xg.shape[:-1], 1)
    return Quantized(value.to(x.dtype), codes, mask, scale.expand(shape), None if offset is None else offset.expand(shape))


def _offset_quantize(x: torch.Tensor, xg: torch.Tensor, cfg: QuantizerConfig, grid: Grid, keep: torch.Tensor | None, rounding_only: bool) -> Quantized:
    """The asymmetric path: the estimator runs on the input centred on the grid's middle
    (m + center * d), which makes it the symmetric "int" grid of half-range s = center * d, and
    picks the codes and the gradient mask; the value is then c * d + m, computed exactly as
    llama.cpp dequantizes Q4_1 (c * d exact, one float32 rounding for + m)."""
    with torch.no_grad():
        step, offset = fit_offset_grid(xg.detach(), grid, cfg.scale, cfg.scale_dtype)
        middle = offset + grid.center * step
        rms = row_rms(xg.detach() - middle)
    half = grid.center * step
    if rounding_only:
        codes, mask = round_to_grid(xg.detach() - middle, half, grid)[1], None
        exact = codes.to(xg.dtype) * step + offset
    else:
        qz = ESTIMATORS[cfg.estimator](xg - middle, half, trust_unit(cfg, grid, half, rms), grid, EstimatorKnobs(cfg.trust_radius(grid), cfg.clip_scale))
        codes, mask = qz.codes, qz.grad_mask
        exact = MaskedStraightThrough.apply(xg, codes.to(xg.dtype) * step + offset, mask)
    return _finish(x, xg, Quantized(exact, codes, mask), keep, half, offset)


class Quantizer(nn.Module):
    """Fake quantizer for one tensor (a weight, or a layer's input activations).

    Its only state is the config and, for LSQ / PACT, the learnable scale. Which path runs
    (fused Triton kernels or `fake_quantize`) is the kernels' one backend decision; the
    config half of it is made here, once.
    """

    def __init__(self, cfg: QuantizerConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = QuantizerConfig.from_mapping(cfg)
        self.grid = quantizer_grid(self.cfg)
        if self.cfg.learnable_scale:
            # One learnable scale per tensor (LSQ / PACT), initialised on the first batch.
            self.scale = nn.Parameter(torch.ones(()))
            self.register_buffer("scale_initialized", torch.zeros((), dtype=torch.bool))
        self.fused_unsupported = fused_unsupported_reason(self.cfg)  # fixed per config
        if self.cfg.backend == "triton" and self.fused_unsupported:
            raise ValueError(f"backend='triton' does not support {self.fused_unsupported}; use backend='auto' or 'torch'")

    def extra_repr(self) -> str:
        c = self.cfg
        if not c.enabled:
            return f"bits=16, rotation={c.rotation}"
        return f"bits={c.bits}, rotation={c.rotation}, grid={c.grid}, scale={c.scale}, estimator={c.estimator}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(self.cfg, self.fused_unsupported, x):
            return fused_fake_quantize(x, self.cfg, self.grid, with_codes=False).value  # training never reads codes
        gradient = torch.is_grad_enabled() and (x.requires_grad or self.cfg.learnable_scale)
        return fake_quantize(x, self.cfg, self.grid, self.learned_scale(x), with_gradient=gradient).value

    def learned_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The learnable scale (initialised from the first batch it sees), or None."""
        if not self.cfg.learnable_scale:
            return None
        if not bool(self.scale_initialized):
            with torch.no_grad():
                rotated = rotate(x.detach(), self.cfg)
                self._init_learnable_scale(row_rms(rotated if rotated.dtype == torch.float64 else rotated.float()))
        return self.scale.abs().clamp_min(1e-8)

    @torch.no_grad()
    def _init_learnable_scale(self, rms: torch.Tensor) -> None:
        init = self.grid.gaussian_scale * rms.mean()
        if dist.is_available() and dist.is_initialized():
            # Ranks see different first batches; parameters must stay identical across ranks.
            dist.all_reduce(init, op=dist.ReduceOp.SUM)
            init /= dist.get_world_size()
        self.scale.copy_(init)
        self.scale_initialized.fill_(True)
