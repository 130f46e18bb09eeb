"""Bit-widths: the one parser, and how many grid levels a width allows."""

from __future__ import annotations

import math
from typing import Any

TERNARY_BITS = 1.58  # log2(3): three levels {-s, 0, +s}
NO_QUANT_BITS = 16
ALLOWED_BITS = "1..8, 1.58 (ternary) or 16 (no quantization)"


def parse_bits(value: Any) -> int | float:
    """Normalise a bit-width: ints 1..8 and 16 stay ints, 1.58 means ternary."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"bits={value!r} is not allowed; use {ALLOWED_BITS}")
    if math.isclose(value, TERNARY_BITS, abs_tol=5e-3):
        return TERNARY_BITS
    if float(value).is_integer() and (1 <= value <= 8 or value == NO_QUANT_BITS):
        return int(value)
    raise ValueError(f"bits={value!r} is not allowed; use {ALLOWED_BITS}")


def n_levels(bits: int | float) -> int:
    """Number of grid levels a bit-width allows (3 for ternary)."""
    bits = parse_bits(bits)
    return 3 if bits == TERNARY_BITS else 2 ** int(bits)
