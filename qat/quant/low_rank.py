"""`LowRankDelta`: a trainable low-rank change (alpha / r) * B @ A to a frozen weight (LoRA).

It does not add a branch beside the layer, x A^T B^T, as unmerged LoRA does. A QuantLinear that
holds one quantizes the MERGED weight, Q((W + (alpha / r) B A) H), in every forward, so training
computes exactly what the merged, exported model computes; the gradient reaches A and B through
the weight quantizer's estimator (dQ/dW is the estimator's, then the chain rule through B @ A).

Shapes: W [out, in], A [r, in], B [out, r]. B starts at zero, so step 0 is the base model
exactly; A starts as nn.Linear's default (Kaiming-uniform with a = sqrt(5), as Hu et al. and
peft), small and random, so that B receives a gradient at the first step.

Dropout: an input-side dropout (B A dropout(x)) has no merged-weight form, so `dropout` drops
whole rank components of the delta instead, B diag(m) A with m ~ Bernoulli(1 - p) / (1 - p),
in training only. 0 (the default) draws nothing from the RNG.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LowRankDelta(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # [r, in]
        self.b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))  # [out, r]
        self.scale = alpha / rank
        self.dropout = dropout
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"rank={self.a.shape[0]}, scale={self.scale:g}, dropout={self.dropout:g}"

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """W + (alpha / r) B A in W's dtype [out, in]. Outside autocast, so that a bf16-mixed
        run forms the same float32 merged weight that merging writes (merge_adapters calls this)."""
        b = self.b
        if self.training and self.dropout > 0:
            keep = torch.rand(1, b.shape[1], device=b.device) >= self.dropout  # [1, r]
            b = b * keep.to(b.dtype) / (1 - self.dropout)
        with torch.autocast(weight.device.type, enabled=False):
            return weight + self.scale * (b @ self.a)


class _RecomputedWeightLinear(torch.autograd.Function):
    """x @ weight_fn()^T + bias whose backward recomputes weight_fn() (the quantized merged weight)
    instead of keeping it from the forward, and pushes the weight's gradient into `trained` (A,
    B, learned scales) through weight_fn's own graph, so through the quantizer's estimator.

    Autograd's F.linear keeps the weight for the input's gradient, and the quantizer keeps its
    temporaries: together more than a weight-sized tensor per layer, alive from the forward to the
    backward; with a frozen base that is most of what a LoRA step holds besides the base (in fp32,
    4 bytes per weight: 27 GB for a 7B). This keeps only x, at the cost of quantizing each
    weight twice. weight_fn must be deterministic (no dropout draw); autocast is re-entered as
    the forward had it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_fn, bias: torch.Tensor | None, *trained: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        ctx.weight_fn, ctx.trained = weight_fn, trained
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.nn.functional.linear(x, weight_fn(), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        device, autocast, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            weight = ctx.weight_fn()
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
            grad_weight = grad_out.flatten(0, -2).t().matmul(x.flatten(0, -2).to(grad_out.dtype)).to(weight.dtype)
            trained = [t for t, needed in zip(ctx.trained, ctx.needs_input_grad[3:]) if needed]
            found = iter(torch.autograd.grad(weight, trained, grad_weight, allow_unused=True) if trained else ())
        grad_bias = grad_out.flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        return (grad_x, None, grad_bias, *(next(found) if needed else None for needed in ctx.needs_input_grad[3:]))


def recomputed_weight_linear(x: torch.Tensor, weight_fn, bias: torch.Tensor | None, trained: list[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight_fn(), bias), keeping only x for the backward (`_RecomputedWeightLinear`)."""
    return _RecomputedWeightLinear.apply(x, weight_fn, bias, *trained)
