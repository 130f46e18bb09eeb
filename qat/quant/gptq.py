"""GPTQ (Frantar et al., 2022) for one weight matrix, in the quantizer's own basis and grid.

The layer computes Q_a(xH) · Q_w(WH)^T. GPTQ rounds the rotated weight W' = WH one input
column at a time and spreads each column's rounding error over the columns not yet rounded,
weighted by the inverse Hessian of the layer's reconstruction loss, H_x = 2 X'^T X' (X' the
rotated, quantized inputs the layer really multiplies). With a rotation this is QuaRot's GPTQ.

What is returned is not only the rounded weight: the project's layers store a latent weight
and quantize it in every forward, with a scale fitted to that latent (c(bits)·RMS by
default). GPTQ's result is therefore kept as the error-compensated latent W~ (each column as
it stood when it was rounded), whose round-to-grid at GPTQ's scales gives GPTQ's codes. The
scale the forward fits to W~ differs slightly from the one GPTQ rounded with, so the scale is
refitted to W~ and GPTQ run again (`refits` times): the forward then reproduces GPTQ's codes
up to the few that sit on a rounding boundary (`code_agreement` reports the share).

A weight quantizer that stores its scale (scale_update frozen / learned) needs no refit: GPTQ
rounds with that scale, which is then kept, and the forward reproduces GPTQ's codes exactly
(qat/ptq/calibration.py pins the few that the float32 latent would round otherwise).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qat.quant.config import QuantizerConfig
from qat.quant.grids import Grid, round_to_grid
from qat.quant.scales import SCALE_FITS, round_scale, row_rms


class GPTQResult(NamedTuple):
    latent: torch.Tensor  # [N, K] rotated basis: the compensated weight the forward quantizes
    quantized: torch.Tensor  # [N, K] rotated basis: GPTQ's rounded weight (codes x scale)
    codes: torch.Tensor  # [N, K] int32: GPTQ's grid codes
    code_agreement: float  # share of codes that the forward's own scale fit reproduces


def gptq_unsupported_reason(cfg: QuantizerConfig) -> str | None:
    """None when GPTQ can round for this weight config, else why not."""
    if not cfg.enabled:
        return "a 16-bit weight (nothing to round)"
    if cfg.learnable_scale:
        return f"scale={cfg.scale!r} (a learned scale; GPTQ needs a fitted one)"
    if cfg.sparsity != "none":
        return f"sparsity={cfg.sparsity!r}"
    if cfg.asymmetric:
        return "asymmetric=true (an offset grid)"
    return None


def fitted_scale(w: torch.Tensor, cfg: QuantizerConfig, grid: Grid) -> torch.Tensor:
    """The forward's scale for the rotated weight w [N, K]: one per row, or [N, K/g] per group."""
    groups = w if cfg.granularity == "row" else w.unflatten(-1, (-1, cfg.granularity))
    scale = round_scale(SCALE_FITS[cfg.scale](groups, row_rms(groups), grid), grid, cfg.scale_dtype)  # [..., 1]
    return scale.squeeze(-1) if cfg.granularity != "row" else scale


def _column_scales(scale: torch.Tensor, cfg: QuantizerConfig, k: int) -> torch.Tensor:
    """[N, K]: the scale each weight is rounded with."""
    if cfg.granularity == "row":
        return scale.expand(-1, k)
    return scale.repeat_interleave(cfg.granularity, dim=1)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of H^-1 after dampening (GPTQ's numerically stable form), and
    the mask of dead inputs (never non-zero in calibration)."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True), dead


def _gptq_pass(w: torch.Tensor, scales: torch.Tensor, hinv: torch.Tensor, grid: Grid, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sweep over the columns with fixed per-weight scales: (compensated latent, rounded, codes)."""
    w = w.clone()
    n, k = w.shape
    latent, rounded = torch.empty_like(w), torch.empty_like(w)
    codes = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    for start in range(0, k, block):
        end = min(start + block, k)
        chunk, h_chunk = w[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.empty_like(chunk)
        for i in range(end - start):
            column = chunk[:, i]
            q, c = round_to_grid(column.unsqueeze(1), scales[:, start + i].unsqueeze(1), grid)
            q = q.squeeze(1)
            latent[:, start + i], rounded[:, start + i], codes[:, start + i] = column, q, c.squeeze(1)
            err = (column - q) / h_chunk[i, i]
            chunk[:, i:] -= err.unsqueeze(1) * h_chunk[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]  # the block's error, onto the later columns
    return latent, rounded, codes


def gptq(
    weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantizerConfig, grid: Grid, *, block: int = 128, damp: float = 0.01, refits: int = 2,
    scale: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ for the ROTATED weight [N, K] (float64 advised) and its input Hessian [K, K].
    scale: a stored scale to round with ([N, 1] per row, [N, K/g] per group): no refits."""
    if why := gptq_unsupported_reason(cfg):
        raise ValueError(f"GPTQ does not support {why}")
    w = weight.to(torch.float64)
    hinv, dead = inverse_hessian_factor(hessian.to(torch.float64), damp)
    w = w.masked_fill(dead.unsqueeze(0), 0.0)  # an input never seen carries no information
    if scale is not None:
        scales = _column_scales(scale.to(torch.float64), cfg, w.shape[1])
        latent, rounded, codes = _gptq_pass(w, scales, hinv, grid, block)
        _, forward_codes = round_to_grid(latent, scales, grid)
        agreement = float((forward_codes == codes).double().mean())
        return GPTQResult(latent.to(weight.dtype), rounded.to(weight.dtype), codes, agreement)
    latent = w
    for _ in range(refits + 1):  # the first scale from W, then refitted to the compensated latent
        scales = _column_scales(fitted_scale(latent, cfg, grid), cfg, w.shape[1])
        latent, rounded, codes = _gptq_pass(w, scales, hinv, grid, block)
    _, forward_codes = round_to_grid(latent, _column_scales(fitted_scale(latent, cfg, grid), cfg, w.shape[1]), grid)
    agreement = float((forward_codes == codes).double().mean())
    return GPTQResult(latent.to(weight.dtype), rounded.to(weight.dtype), codes, agreement)
