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
