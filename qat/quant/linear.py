"""`QuantLinear`: nn.Linear whose input and weight pass through fake quantizers.

With rotation="hadamard" both operands are rotated along the input (reduction) dim and
quantized in the rotated basis; since (x H)(W H)^T = x W^T for orthogonal H, no inverse
rotation is needed (QuEST's "half Hadamard"). The `weight` parameter keeps its name, so
state dicts stay interchangeable with nn.Linear.

In eval without autograd (validation, evaluation, generation) the quantized weight is computed
once and reused: the weights do not change between decoding steps, and re-rotating and
re-quantizing every matrix for every token was most of a decode step on a real model.
`fold_input_rotations(net)` goes one step further for decoding 16-bit-input layers.

A layer may hold a `lora` (qat/quant/low_rank.py, attached by qat/train/lora.py): its weight
quantizer then sees the merged weight W + (alpha / r) B A, re-formed in every forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.config import QuantizerConfig
from qat.quant.hadamard import hadamard_transform
from qat.quant.low_rank import LowRankDelta, recomputed_weight_linear
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
        if a.holds_scale:  # every input is new: there is no scale to keep
            raise ValueError(f"scale_update={a.scale_update!r} is for weights; an activation's scale is fitted to each input (use scale_update='refit' on the activation side)")
        self.weight_quantizer.hold_scale((out_features, in_features), device)
        if (w.rotation, w.block_for(in_features)) != (a.rotation, a.block_for(in_features)) and "hadamard" in (w.rotation, a.rotation):
            # One rotated operand alone computes x (W H)^T != x W^T: the layer would silently change.
            raise ValueError(
                f"weight rotation ({w.rotation}, block {w.hadamard_block}) and input rotation "
                f"({a.rotation}, block {a.hadamard_block}) must match; a 16-bit side may still rotate"
            )

        self.lora: LowRankDelta | None = None  # None: no state-dict entries, the plain layer's keys
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        # Opt-in (fold_input_rotations): in eval without autograd a 16-bit input is not rotated;
        # the cached weight is rotated back instead. The same product within float error, not
        # bit for bit, so training's forward and evaluation keep the rotated form.
        self.fold_input_rotation = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_input_rotation and self._can_fold() and self._caching():
            return F.linear(x, self._cached_weight(folded=True), self.bias)
        x = self.input_quantizer(x)
        if self._recompute_weight():
            trained = [p for p in (self.weight, *self.lora.parameters(), *self.weight_quantizer.parameters()) if p.requires_grad]
            return recomputed_weight_linear(x, self._merged_quantized_weight, self.bias, trained)
        return F.linear(x, self.quantized_weight(), self.bias)

    def _merged_quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.latent_weight())

    def _recompute_weight(self) -> bool:
        """A LoRA layer in a training step: the backward recomputes the quantized merged weight
        rather than keep it (qat/quant/low_rank.py). Not under torch.compile (its backward calls
        autograd.grad, which a compiled graph does not trace) nor with adapter dropout (a recompute
        would draw another mask)."""
        lora = self.lora
        return lora is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling() and not (self.training and lora.dropout > 0)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight in the rotated basis. Cached in eval without autograd, keyed
        by the weight's identity, storage, dtype and in-place version (an optimizer step or
        load_state_dict bumps it), the quantizer and its config, and the same of its learned
        scale; train() drops it.
        Training, autograd and compiled graphs always recompute."""
        return self._cached_weight(folded=False) if self._caching() else self.weight_quantizer(self.latent_weight())

    def latent_weight(self) -> torch.Tensor:
        """What the weight quantizer rounds: W, or with an adapter the merged W + (alpha / r) B A."""
        return self.weight if self.lora is None else self.lora(self.weight)

    def _caching(self) -> bool:
        return not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())

    def _can_fold(self) -> bool:
        """A 16-bit input whose only transform is the rotation: (x H) Q^T = x (Q H^T)^T."""
        a = self.input_quantizer.cfg
        return not a.enabled and a.sparsity == "none" and self.weight_quantizer.cfg.rotation == "hadamard"

    def _cached_weight(self, folded: bool) -> torch.Tensor:
        quantizer = self.weight_quantizer  # swapped or re-configured (sensitivity probes): a new key
        key = (folded, id(quantizer), quantizer.cfg, _version_key(self.weight), *(_version_key(t) for t in (*quantizer.parameters(), *quantizer.buffers())))
        if self.lora is not None:  # an optimizer step on A or B, or another adapter: a new key
            key += (self.lora.scale, *(_version_key(t) for t in self.lora.parameters()))
        if None not in key and self._weight_cache is not None and self._weight_cache[0] == key:
            return self._weight_cache[1]
        weight = quantizer(self.latent_weight())
        if folded:  # back to the input's own basis by H^T (H^-1; a Paley block is not symmetric)
            weight = hadamard_transform(weight, quantizer.cfg.hadamard_block, inverse=True)
        if None not in key:
            self._weight_cache = (key, weight)
        return weight

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
        new.weight_quantizer.hold_scale((new.out_features, new.in_features), linear.weight.device)  # not on meta
        return new.to(linear.weight.device)  # moves only the quantizers' own state

    def to_linear(self) -> nn.Linear:
        """The plain layer holding the latent (unquantized) weights, parameters shared."""
        if self.lora is not None:  # the plain layer would silently drop the adapter
            raise ValueError("this layer holds a LoRA adapter; merge it first (qat.train.lora.merge_adapters)")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear


@torch.no_grad()
def set_held_scales(net: nn.Module) -> list[str]:
    """Fit every stored weight scale (scale_update frozen / learned) not yet set to its layer's
    weight, as the first forward would. train.py calls it once the weights are loaded and before
    a strategy wraps the model: under FSDP a first forward sees only gathered copies. A resume
    then overwrites the scales with the checkpoint's. A model on the meta device (a free probe of
    the dims) has nothing to fit. Returns the layers it set."""
    done = []
    for name, module in net.named_modules():
        if not isinstance(module, QuantLinear) or not module.weight_quantizer.cfg.holds_scale or module.weight.is_meta:
            continue
        if not bool(module.weight_quantizer.scale_initialized):
            module.weight_quantizer.held_scale(module.latent_weight())
            done.append(name)
    return done


def fold_input_rotations(net: nn.Module) -> list[str]:
    """For decoding: every QuantLinear with a 16-bit, rotated input multiplies its input as is
    by the cached Q(W H) H^T (eval without autograd only; training is untouched). Removes the
    per-token rotation, the rest of a W4A16 decode step's overhead over a plain Linear. The
    logits equal the unfolded model's within float32 error. Returns the folded layers' names."""
    folded = []
    for name, module in net.named_modules():
        if isinstance(module, QuantLinear) and module._can_fold():
            module.fold_input_rotation = True
            module._weight_cache = None
            folded.append(name)
    return folded
