"""Precision keys: the name a run's number format goes by in result tables and fits.

`w4a4` (QuEST INT4 with Hadamard), `bf16`, `w4a16` (weight-only), `fp4`, `2:4`, with a
suffix for anything that changes the method at the same bit-width (`-nohad`, `-ste`, ...),
so that one eff(P) is fitted per (format, method).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    quantized = weight if weight.enabled else activation
    suffix = ""
    if quantized.rotation == "none":
        suffix += "-nohad"
    if quantized.grid not in ("int", "fp4"):
        suffix += f"-{quantized.grid}"
    if quantized.estimator in ("ste", "lsq", "pact"):
        suffix += f"-{quantized.estimator}"
    return base + suffix


def storage_bits(w_bits: float, sparse_2_of_4: bool = False) -> float:
    """Bits stored per weight: the weight bits (16 for bf16, 4 for fp4), or for 2:4 sparsity
    half the values plus 0.5 bits of position per weight (2.5 at 4 bits). Activations are
    not stored, so they do not count."""
    return w_bits / 2 + 0.5 if sparse_2_of_4 else float(w_bits)
