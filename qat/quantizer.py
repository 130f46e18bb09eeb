"""`Quantizer`: the fake-quantizer module, rotation -> scale fit -> grid -> estimator.

forward(x) returns the fake-quantized tensor in the ROTATED basis (QuEST's "half
Hadamard"): a linear layer rotates both operands along the reduction dim, so no inverse
rotation is ever needed. The composition is data-driven: each config field selects a
small registered function; there is no class per combination.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qat.config import QuantizerConfig
from qat.estimators import ESTIMATORS, Quantized
from qat.grids import make_grid
from qat.hadamard import hadamard_transform
from qat.scales import SCALE_FITS, row_rms
from qat.sparsity import two_of_four_mask


def triton_unsupported_reason(cfg: QuantizerConfig) -> str | None:
    """None when the fused Triton kernels cover this configuration, else why not."""
    rules = (
        (cfg.enabled, "bits=16"),
        (cfg.grid in ("int", "int_zero"), f"grid={cfg.grid!r} (supported: 'int', 'int_zero')"),
        (cfg.scale == "rms_mse", f"scale={cfg.scale!r} (supported: 'rms_mse')"),
        (cfg.estimator in ("trust", "ste", "clip"), f"estimator={cfg.estimator!r} (supported: 'trust', 'ste', 'clip')"),
        (cfg.granularity == "row", f"granularity={cfg.granularity!r} (supported: 'row')"),
        (cfg.sparsity == "none", f"sparsity={cfg.sparsity!r} (supported: 'none')"),
    )
    return next((why for ok, why in rules if not ok), None)


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _grouped(x: torch.Tensor, granularity: int | str) -> torch.Tensor:
    """View [..., K] as [..., K/g, g] so that the last dim holds one scale's elements."""
    if granularity == "row":
        return x
    if x.shape[-1] % granularity:
        raise ValueError(f"granularity={granularity} does not divide the last dim {x.shape[-1]}")
    return x.unflatten(-1, (-1, granularity))


class Quantizer(nn.Module):
    """Fake quantizer for one tensor (a weight, or a layer's input activations)."""

    def __init__(self, cfg: QuantizerConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = QuantizerConfig.from_mapping(cfg)
        self.grid = make_grid(self.cfg.bits, self.cfg.grid) if self.cfg.enabled else None
        self.track_stats = False  # set by the trainer on telemetry steps
        self.stats: dict[str, torch.Tensor] = {}
        if self.cfg.learnable_scale:
            # One learnable scale per tensor (LSQ / PACT), initialised on the first batch.
            self.scale = nn.Parameter(torch.ones(()))
            self.register_buffer("scale_initialized", torch.zeros((), dtype=torch.bool))
        self._triton_supported = triton_unsupported_reason(self.cfg) is None  # fixed per config
        if self.cfg.backend == "triton" and (why := triton_unsupported_reason(self.cfg)):
            raise ValueError(f"backend='triton' does not support {why}; use backend='auto' or 'torch'")

    def extra_repr(self) -> str:
        c = self.cfg
        if not c.enabled:
            return f"bits=16, rotation={c.rotation}"
        return f"bits={c.bits}, rotation={c.rotation}, grid={c.grid}, scale={c.scale}, estimator={c.estimator}"

    def use_triton(self, x: torch.Tensor) -> bool:
        if self.cfg.backend == "torch" or not self._triton_supported:
            return False
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            if self.cfg.backend == "triton":
                raise ValueError(f"backend='triton' supports fp32/bf16/fp16 inputs, got {x.dtype}")
            return False
        runnable = x.is_cuda or (interpreting() and x.device.type == "cpu")
        if self.cfg.backend == "triton" and not runnable:
            raise ValueError(f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1), got device {x.device}")
        return runnable if self.cfg.backend == "triton" else x.is_cuda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if self.use_triton(x):
            from kernels import fused_quantize  # lazy: kernels import triton

            qz = fused_quantize(x, cfg, with_codes=False)  # training never reads the codes
            if self.track_stats:
                self._record(self._rotate(x), qz)
            return qz.value
        x = self._rotate(x)
        keep = two_of_four_mask(x) if cfg.sparsity == "2:4" else None
        if not cfg.enabled:
            return x if keep is None else x * keep
        # fp32 math for half inputs (codes must not depend on bf16 rounding); fp64 stays fp64.
        xg = _grouped(x if x.dtype in (torch.float32, torch.float64) else x.float(), cfg.granularity)
        with torch.no_grad():
            rms = row_rms(xg)
        qz = ESTIMATORS[cfg.estimator](xg, self._scale(xg.detach(), rms), rms, self.grid, cfg)
        value = qz.value.reshape(x.shape)
        if keep is not None:
            # Pruned entries are exactly zero and get no gradient.
            value = value * keep
            qz = Quantized(value, qz.codes, qz.grad_mask.reshape(x.shape) & keep)
        if self.track_stats:
            self._record(x, qz._replace(value=value))
        return value.to(x.dtype)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x, self.cfg.hadamard_block) if self.cfg.rotation == "hadamard" else x

    def _scale(self, x: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
        if not self.cfg.learnable_scale:
            return SCALE_FITS[self.cfg.scale](x, rms, self.grid)
        if not bool(self.scale_initialized):
            self._init_learnable_scale(rms)
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

    @torch.no_grad()
    def _record(self, rotated: torch.Tensor, qz: Quantized) -> None:
        """Telemetry: fraction of elements whose gradient is masked, relative squared error."""
        ref = rotated.float().reshape(qz.value.shape)
        self.stats = {
            "masked_fraction": 1.0 - qz.grad_mask.float().mean(),
            "rel_error": (qz.value.float() - ref).square().sum() / ref.square().sum().clamp_min(1e-30),
        }
