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
from qat.quant.estimators import ESTIMATORS, EstimatorKnobs, LearnedRange, MaskedStraightThrough, Quantized, lsq_grad_scale
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
    forward is the plain rounding. LSQ and PACT always run their estimator. A stored weight
    scale (scale_update frozen / learned, Quantizer.held_scale) comes in as `scale` too; a
    learned one gets LSQ's step gradient whatever the estimator.
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
    with torch.no_grad():  # a pass over the tensor that absmax and stored scales do not need
        rms = row_rms(xg) if reads_rms(cfg, fitting=scale is None) else None
    if scale is None:
        if cfg.learnable_scale:
            raise ValueError("scale='lsq' is learned: pass the quantizer's scale (Quantizer.held_scale)")
        scale = fit_scale(xg.detach(), cfg, grid, rms)
    elif cfg.holds_scale:  # idempotent on a stored float16 step; straight-through for a learned one
        scale = round_scale(scale, grid, cfg.scale_dtype)
    if rounding_only:
        qz = Quantized(*round_to_grid(xg.detach(), scale.detach(), grid), None)
    else:
        fixed = scale if cfg.learnable_scale else scale.detach()  # only LSQ / PACT train a scale through the estimator
        qz = ESTIMATORS[cfg.estimator](xg, fixed, trust_unit(cfg, grid, fixed, rms), grid, EstimatorKnobs(cfg.trust_radius(grid), cfg.clip_scale))
        if cfg.holds_scale and scale.requires_grad:
            q = qz.value.detach()
            qz = qz._replace(value=LearnedRange.apply(qz.value, xg.detach(), q, scale, lsq_grad_scale(xg.shape[-1], grid)))
    return _finish(x, xg, qz, keep, scale.detach())


def reads_rms(cfg: QuantizerConfig, fitting: bool) -> bool:
    """Whether a call reads the row RMS: the Gaussian fits (rms_mse, and mse_search's first
    candidate) when the scale is fitted, and the trust radius when it is in RMS units."""
    return (fitting and cfg.scale != "absmax") or cfg.trust is not None or (cfg.scale == "rms_mse" and not cfg.holds_scale)


def fit_scale(xg: torch.Tensor, cfg: QuantizerConfig, grid: Grid, rms: torch.Tensor | None = None) -> torch.Tensor:
    """The config's scale fit of the grouped tensor xg [..., g] (no gradient): [..., 1]."""
    rms = row_rms(xg) if rms is None and cfg.scale != "absmax" else rms  # absmax reads no RMS
    return round_scale(SCALE_FITS[cfg.scale](xg, rms, grid), grid, cfg.scale_dtype)


def trust_unit(cfg: QuantizerConfig, grid: Grid, scale: torch.Tensor, rms: torch.Tensor | None) -> torch.Tensor:
    """What the trust radius is a multiple of. QuEST's default radius is half the outermost grid
    step at the Gaussian-optimal scale c * RMS, in RMS units. Under another scale fit (absmax,
    mse_search) the grid's steps are that scale's, so the default radius follows it:
    default_trust * s / c is half the outermost step at the scale s actually used. Without that,
    a group-absmax scale (steps wider than c * RMS's) masked ordinary elements near a rounding
    midpoint, and training with a rotation diverged (docs/results.md). An explicit `trust` stays
    in RMS units; at the rms_mse scale refitted in every forward the unit is RMS itself, bit for bit
    as before (a stored scale no longer equals c * RMS of the weight it meets)."""
    if cfg.trust is not None or (cfg.scale == "rms_mse" and not cfg.holds_scale):
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

    Its only state is the config and, where the config keeps one, its scale: LSQ / PACT's
    learnable scalar, or a weight's stored per-row / per-group scale (scale_update frozen or
    learned, allocated by `hold_scale`). Which path runs (fused Triton kernels or
    `fake_quantize`) is the kernels' one backend decision; the config half of it is made here,
    once.
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

    def hold_scale(self, weight_shape: tuple[int, int], device: torch.device | str | None = None) -> None:
        """Allocate the stored scale of a [N, K] weight (scale_update frozen / learned): [N, 1]
        per row or [N, K/g, 1] per group, set from the weight on first use (or by GPTQ)."""
        if not self.cfg.holds_scale:
            return
        rows, cols = weight_shape
        gran = self.cfg.granularity
        shape = (rows, 1) if gran == "row" else (rows, cols // gran, 1)
        scale = torch.ones(shape, device=device)
        if self.cfg.scale_update == "learned":
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("scale_initialized", torch.zeros((), dtype=torch.bool, device=device))

    def extra_repr(self) -> str:
        c = self.cfg
        if not c.enabled:
            return f"bits=16, rotation={c.rotation}"
        held = f", scale_update={c.scale_update}" if c.holds_scale else ""
        return f"bits={c.bits}, rotation={c.rotation}, grid={c.grid}, scale={c.scale}{held}, estimator={c.estimator}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(self.cfg, self.fused_unsupported, x):
            return fused_fake_quantize(x, self.cfg, self.grid, with_codes=False).value  # training never reads codes
        gradient = torch.is_grad_enabled() and (x.requires_grad or self.cfg.learnable_scale or self._trains_held_scale())
        return fake_quantize(x, self.cfg, self.grid, self.held_scale(x), with_gradient=gradient).value

    def quantize(self, x: torch.Tensor) -> Quantized:
        """What the forward computes from x, with codes and scales and no gradient: the
        exporters', telemetry's and GPTQ's view of it (torch path, the fused kernels' reference)."""
        return fake_quantize(x, self.cfg, self.grid, self.held_scale(x), with_gradient=False)

    def _trains_held_scale(self) -> bool:
        return self.cfg.holds_scale and self.scale.requires_grad

    def held_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The scale this quantizer keeps (initialised from x, the first batch or the weight,
        when never set), or None when it fits one to every input."""
        if not (self.cfg.learnable_scale or self.cfg.holds_scale):
            return None
        if not bool(self.scale_initialized):
            with torch.no_grad():
                rotated = rotate(x.detach(), self.cfg)
                rotated = rotated if rotated.dtype == torch.float64 else rotated.float()
                if self.cfg.holds_scale:
                    self.set_held_scale(fit_scale(grouped(rotated, self.cfg.granularity), self.cfg, self.grid))
                else:
                    self._init_learnable_scale(row_rms(rotated))
        if self.cfg.holds_scale:
            return self.scale
        return self.scale.abs().clamp_min(1e-8)

    def scale_to_export(self, x: torch.Tensor, where: str) -> torch.Tensor | None:
        """The held scale an exporter writes with x's codes, or None (a fit of x). An LSQ / PACT
        scale never initialised would be set from the first batch the model sees, which export
        cannot know, so it is refused; a stored weight scale never set is the weight's own fit,
        as the first forward would make it."""
        if self.cfg.learnable_scale and not bool(self.scale_initialized):
            raise ValueError(f"{where}: the learned scale was never initialised; run the model on data once before exporting")
        scale = self.held_scale(x)
        return None if scale is None else scale.detach()

    @torch.no_grad()
    def set_held_scale(self, scale: torch.Tensor) -> None:
        """Store a weight's scale (the config's fit, or GPTQ's): [N, 1] or [N, K/g, 1]."""
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.scale_initialized.fill_(True)

    @torch.no_grad()
    def _init_learnable_scale(self, rms: torch.Tensor) -> None:
        init = self.grid.gaussian_scale * rms.mean()
        if dist.is_available() and dist.is_initialized():
            # Ranks see different first batches; parameters must stay identical across ranks.
            dist.all_reduce(init, op=dist.ReduceOp.SUM)
            init /= dist.get_world_size()
        self.scale.copy_(init)
        self.scale_initialized.fill_(True)
