"""`QuantLinear`: nn.Linear whose input and weight pass through fake quantizers.

With rotation="hadamard" both operands are rotated along the input (reduction) dim and
quantized in the rotated basis; since (x H)(W H)^T = x W^T for orthogonal H, no inverse
rotation is needed (QuEST's "half Hadamard"). The `weight` parameter keeps its name, so
state dicts stay interchangeable with nn.Linear.

In eval without autograd (validation, evaluation, generation) the quantized weight is computed
once and reused: the weights do not change between decoding steps, and re-rotating and
re-quantizing every matrix for every token was most of a decode step on a real model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.config import QuantizerConfig
from qat.quant.quantizer import Quantizer

ConfigLike = QuantizerConfig | Mapping[str, Any] | None


def _version_key(t: torch.Tensor) -> tuple | None:
    # An inference tensor has no version counter: it could change in place unseen, so no cache.
    return None if t.is_inference() else (id(t), t.data_ptr(), t._version, t.dtype, t.device)


class QuantLinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_config: ConfigLike = None,
        input_config: ConfigLike = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_quantizer = Quantizer(weight_config)
        self.input_quantizer = Quantizer(input_config)
        w, a = self.weight_quantizer.cfg, self.input_quantizer.cfg
        if (w.rotation, w.block_for(in_features)) != (a.rotation, a.block_for(in_features)) and "hadamard" in (w.rotation, a.rotation):
            # One rotated operand alone computes x (W H)^T != x W^T: the layer would silently change.
            raise ValueError(
                f"weight rotation ({w.rotation}, block {w.hadamard_block}) and input rotation "
                f"({a.rotation}, block {a.hadamard_block}) must match; a 16-bit side may still rotate"
            )

        self._weight_cache: tuple[tuple, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight in the rotated basis. Cached in eval without autograd, keyed
        by the weight's identity, storage, dtype and in-place version (an optimizer step or
        load_state_dict bumps it), the quantizer and its config, and the same of its learned
        scale; train() drops it.
        Training, autograd and compiled graphs always recompute."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.weight_quantizer(self.weight)
        quantizer = self.weight_quantizer  # swapped or re-configured (sensitivity probes): a new key
        key = (id(quantizer), quantizer.cfg, _version_key(self.weight), *(_version_key(t) for t in (*quantizer.parameters(), *quantizer.buffers())))
        if None in key:
            return self.weight_quantizer(self.weight)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self.weight_quantizer(self.weight))
        return self._weight_cache[1]

    def train(self, mode: bool = True) -> QuantLinear:
        self._weight_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() / .double(): the old copy is stale
        self._weight_cache = None
        return super()._apply(fn, recurse)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_config: ConfigLike = None, input_config: ConfigLike = None) -> QuantLinear:
        """Wrap an existing layer, sharing (not copying) its weight and bias parameters."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_config=weight_config,
            input_config=input_config,
            device="meta",
        )
        new.weight = linear.weight
        new.bias = linear.bias
        return new.to(linear.weight.device)  # moves only the quantizers' own state

    def to_linear(self) -> nn.Linear:
        """The plain layer holding the latent (unquantized) weights, parameters shared."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear
