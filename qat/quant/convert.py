"""`quantize_model`: swap a built model's nn.Linear layers for QuantLinear, in place.

The model never knows about quantization (it is built plain, then converted), so the same
model code serves bf16 baselines and every quantized variant.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qat.quant.linear import ConfigLike, QuantLinear
from qat.quant.quantizer import Quantizer

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
) -> list[str]:
    """Replace every nn.Linear that `filter_fn(module, name)` accepts (default: all but
    `lm_head`) by a QuantLinear sharing its parameters. Returns the swapped module names."""
    accept = filter_fn or default_filter
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name and accept(module, name)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(module, weight_config=weight, input_config=activation))
    return [name for name, _ in targets]


def quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """All fake quantizers of a converted model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}
