"""`quantize_model`: swap a built model's nn.Linear layers for QuantLinear, in place.

The model never knows about quantization (it is built plain, then converted), so the same
model code serves bf16 baselines and every quantized variant. Per-layer precision comes in
as `rules` (qat/quant/rules.py), resolved here against the layers the filter accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from qat.quant.config import QuantizerConfig
from qat.quant.linear import ConfigLike, QuantLinear
from qat.quant.quantizer import Quantizer
from qat.quant.rules import LayerRule, resolve_layers

# QuEST keeps the output head in high precision; embeddings are nn.Embedding and never match.
DEFAULT_SKIP = ("lm_head",)

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, name: str) -> bool:
    """Every nn.Linear except a module named `lm_head`."""
    return name.rsplit(".", 1)[-1] not in DEFAULT_SKIP


def quantize_model(
    model: nn.Module,
    weight: ConfigLike = None,
    activation: ConfigLike = None,
    filter_fn: FilterFn | None = None,
    rules: Sequence[LayerRule] = (),
) -> list[str]:
    """Replace every nn.Linear that `filter_fn(module, name)` accepts (default: all but
    `lm_head`) by a QuantLinear sharing its parameters, with `weight` / `activation` as
    changed by `rules` for that layer (an excluded layer stays nn.Linear). Returns the
    swapped module names. A rule matching none of the accepted layers is a ValueError."""
    accept = filter_fn or default_filter
    targets = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name and accept(module, name)
    }
    if not targets:
        return []  # already converted (idempotent) or nothing to convert
    resolved = resolve_layers(list(targets), QuantizerConfig.from_mapping(weight), QuantizerConfig.from_mapping(activation), rules)
    swapped = []
    for name, quant in resolved.items():
        if quant is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            layer = QuantLinear.from_linear(targets[name], weight_config=quant.weight, input_config=quant.activation)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
        setattr(parent, child, layer)
        swapped.append(name)
    return swapped


def quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """All fake quantizers of a converted model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}
