"""Precision keys: the name a run's number format goes by in result tables and fits.

`w4a4` (QuEST INT4 with Hadamard), `bf16`, `w4a16` (weight-only), `fp4`, `2:4`, with a
suffix for anything that changes the method at the same bit-width (`-nohad`, `-ste`, ...),
so that one eff(P) is fitted per (format, method).

Mixed-precision runs (per-layer rules, qat/quant/rules.py) are keyed by their
parameter-weighted mean bits over the block linears (every layer quantize_model may swap;
embeddings and lm_head are outside every key, as in uniform runs):

    w_bits = sum_l P_l * wbits_l / sum_l P_l,    a_bits = sum_l P_l * abits_l / sum_l P_l

where P_l is layer l's weight parameter count (in * out) and a layer a rule excluded counts
as 16 bits on both sides. Both means are rounded to 2 decimals, and the key is
`w{w_bits}a{a_bits}-mixed` plus the method suffix of the configs most parameters carry, e.g.
`w3a4.15-mixed` for the debug model at W3A3 with every FC2 input at 8 bits. memory_bits is
the same mean of each layer's stored bits (`storage_bits`). A run whose layers all resolve
to one config (none excluded) is uniform and keeps its plain key, exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # no runtime import: qat.scaling must import without torch
    from qat.quant.config import QuantizerConfig


def format_bits(bits: float) -> str:
    return str(int(bits)) if float(bits).is_integer() else f"{bits:g}"


def precision_key(weight: QuantizerConfig, activation: QuantizerConfig) -> str:
    if not weight.enabled and not activation.enabled and weight.sparsity == "none":
        return "bf16"
    if weight.sparsity == "2:4":
        base = "2:4"
    elif weight.grid == "fp4":
        base = "fp4"
    else:
        base = f"w{format_bits(weight.bits)}a{format_bits(activation.bits)}"
    return base + method_suffix(weight, activation)


def method_suffix(weight: QuantizerConfig, activation: QuantizerConfig) -> str:
    """What changes the method at the same bit-width: `-nohad`, `-gaussian`, `-ste`, ..."""
    quantized = weight if weight.enabled else activation
    suffix = ""
    if quantized.rotation == "none":
        suffix += "-nohad"
    if quantized.grid not in ("int", "fp4"):
        suffix += f"-{quantized.grid}"
    if quantized.estimator in ("ste", "lsq", "pact"):
        suffix += f"-{quantized.estimator}"
    return suffix


def storage_bits(w_bits: float, sparse_2_of_4: bool = False) -> float:
    """Bits stored per weight: the weight bits (16 for bf16, 4 for fp4), or for 2:4 sparsity
    half the values plus 0.5 bits of position per weight (2.5 at 4 bits). Activations are
    not stored, so they do not count."""
    return w_bits / 2 + 0.5 if sparse_2_of_4 else float(w_bits)


NO_QUANT_BITS = 16.0  # a layer kept plain (excluded by a rule) stores and computes in 16 bits
MIXED_DECIMALS = 2  # mean bits are rounded so that reruns of one rule set share one key


class LayerPrecision(NamedTuple):
    """One block linear: its weight parameter count and configs (None: excluded, plain)."""

    params: int
    weight: QuantizerConfig | None
    activation: QuantizerConfig | None


class RunPrecision(NamedTuple):
    key: str
    w_bits: float
    a_bits: float
    memory_bits: float


def _bits(cfg: QuantizerConfig | None) -> float:
    return NO_QUANT_BITS if cfg is None else float(cfg.bits)


def _storage(layer: LayerPrecision) -> float:
    return NO_QUANT_BITS if layer.weight is None else storage_bits(float(layer.weight.bits), layer.weight.sparsity == "2:4")


def run_precision(layers: Sequence[LayerPrecision]) -> RunPrecision:
    """A run's key, weight / activation bits and stored bits per weight (module docstring):
    the uniform key when every layer has one config, the parameter-weighted means otherwise."""
    configs = {(repr(l.weight), repr(l.activation)) for l in layers}
    first = layers[0] if layers else LayerPrecision(0, None, None)
    if len(configs) <= 1 and first.weight is not None and first.activation is not None:
        w, a = first.weight, first.activation
        return RunPrecision(precision_key(w, a), float(w.bits), float(a.bits), storage_bits(float(w.bits), w.sparsity == "2:4"))
    if all(l.weight is None for l in layers):
        return RunPrecision("bf16", NO_QUANT_BITS, NO_QUANT_BITS, NO_QUANT_BITS)
    total = sum(l.params for l in layers)

    def mean(value: Callable[[LayerPrecision], float]) -> float:
        return round(sum(l.params * value(l) for l in layers) / total, MIXED_DECIMALS)

    w_bits, a_bits = mean(lambda l: _bits(l.weight)), mean(lambda l: _bits(l.activation))
    by_params: dict[tuple[str, str], int] = {}
    for l in layers:
        if l.weight is not None:
            key = (repr(l.weight), repr(l.activation))
            by_params[key] = by_params.get(key, 0) + l.params
    main = max(by_params, key=by_params.__getitem__)
    dominant = next(l for l in layers if (repr(l.weight), repr(l.activation)) == main)
    key = f"w{format_bits(w_bits)}a{format_bits(a_bits)}-mixed" + method_suffix(dominant.weight, dominant.activation)
    return RunPrecision(key, w_bits, a_bits, mean(_storage))
