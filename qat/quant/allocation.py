"""Bit allocation under a weight-memory budget: an exact multiple-choice knapsack.

Each target (a layer, or a pattern over layers) picks one bit-width b from the candidates;
picking it costs params * b bits of weight memory and adds sens(target, b) to the loss
(the measured increase in validation loss, scripts/layer_sensitivity.py; treated as
additive across targets, which is the model's assumption, not a fact). We minimise

    sum_t sens(t, b_t)   subject to   sum_t params_t * b_t <= budget * sum_t params_t

exactly, by dynamic programming over integer memory units: every cost params_t * b is an
integer multiple of g = gcd of all of them (times the common denominator of fractional
widths such as 1.58), so the table has budget * total / g + 1 columns. For real models g
is large (products of widths that are multiples of 128), so that stays small; a table too
large for memory is refused with a ValueError rather than approximated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from qat.quant.bits import parse_bits
from qat.quant.rules import LayerRule

# The sensitivity table (scripts/layer_sensitivity.py writes it, scripts/allocate_bits.py reads it).
SENSITIVITY_COLUMNS = ("match", "layers", "side", "bits", "params", "loss", "delta")
SENSITIVITY_SIDES = ("weight", "activation", "both")  # which quantizer of a target a row probed
ALLOCATION_SIDES = ("weight", "both")  # the budget is weight memory: an input-only choice costs none
MAX_TABLE_CELLS = 200_000_000  # targets x memory units of the DP's choice table (int8: 200 MB)


@dataclass(frozen=True)
class Target:
    """One choice: `match` (a layer name or glob), its weight parameters, and the loss
    increase at each candidate bit-width."""

    match: str
    params: int
    sensitivity: Mapping[float, float]


@dataclass(frozen=True)
class Allocation:
    bits: dict[str, float]  # match -> chosen width, in target order
    predicted_increase: float  # sum of the chosen sensitivities
    memory_bits: float  # sum of params * bits over the targets
    total_params: int

    @property
    def bits_per_param(self) -> float:
        return self.memory_bits / self.total_params


def _exact(bits: float) -> Fraction:
    return Fraction(str(bits))  # 1.58 -> 79/50, not the binary float's 2^-52 noise


def allocate(targets: Sequence[Target], budget_bits_per_param: float, bits: Sequence[float]) -> Allocation:
    """The minimum-sensitivity choice of one width in `bits` per target whose weight memory
    is at most budget * total params (module docstring). Ties go to less memory."""
    widths = sorted({parse_bits(b) for b in bits})
    if not targets:
        raise ValueError("no targets to allocate; the sensitivity table is empty")
    if not (isinstance(budget_bits_per_param, (int, float)) and math.isfinite(budget_bits_per_param) and budget_bits_per_param > 0):
        raise ValueError(f"budget={budget_bits_per_param!r} must be a finite number of bits per parameter > 0")
    if budget_bits_per_param < widths[0]:
        raise ValueError(f"budget={budget_bits_per_param:g} bits/param is below the narrowest candidate width {widths[0]:g}; nothing fits")
    for t in targets:
        if not (isinstance(t.params, int) and t.params > 0):
            raise ValueError(f"target {t.match!r}: params={t.params!r} must be a positive integer")
        missing = [b for b in widths if b not in t.sensitivity]
        if missing:
            raise ValueError(f"target {t.match!r} has no sensitivity at {missing[0]:g} bits; measure it or drop it from --bits")
        bad = [b for b in widths if not math.isfinite(t.sensitivity[b])]
        if bad:
            raise ValueError(f"target {t.match!r}: sensitivity at {bad[0]:g} bits is {t.sensitivity[bad[0]]!r}; need a finite number")

    # Integer memory units: cost[t][j] = params_t * widths[j] / unit, exactly.
    denominator = math.lcm(*(_exact(b).denominator for b in widths))
    raw = [[t.params * int(_exact(b) * denominator) for b in widths] for t in targets]
    unit = math.gcd(*(c for row in raw for c in row))
    cost = [[c // unit for c in row] for row in raw]
    total = sum(t.params for t in targets)
    capacity = min(math.floor(_exact(budget_bits_per_param) * total * denominator / unit), sum(max(row) for row in cost))
    if len(targets) * (capacity + 1) > MAX_TABLE_CELLS:
        raise ValueError(
            f"the exact allocation needs a {len(targets)} x {capacity + 1} table (> {MAX_TABLE_CELLS:,} cells); "
            "measure by layer type (--by type) or use widths whose products with the layer sizes share a larger factor"
        )

    # best[u]: least summed sensitivity of the targets so far using exactly u memory units.
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    choices = np.full((len(targets), capacity + 1), -1, dtype=np.int8)
    for i, t in enumerate(targets):
        new = np.full(capacity + 1, np.inf)
        for j, b in enumerate(widths):
            c = cost[i][j]
            if c > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[c:] = best[: capacity + 1 - c] + t.sensitivity[b]
            better = candidate < new  # strict: on a tie the narrower width (earlier j) stays
            new[better] = candidate[better]
            choices[i, better] = j
        best = new
    used = int(np.argmin(best))  # the first minimum: the least memory among equal losses
    if not math.isfinite(best[used]):
        raise ValueError(f"no choice of widths fits budget={budget_bits_per_param:g} bits/param")
    picked: list[float] = []
    for i in reversed(range(len(targets))):
        j = int(choices[i, used])
        picked.append(widths[j])
        used -= cost[i][j]
    picked.reverse()
    chosen = {t.match: b for t, b in zip(targets, picked)}
    return Allocation(
        bits=chosen,
        predicted_increase=float(sum(t.sensitivity[b] for t, b in zip(targets, picked))),
        memory_bits=float(sum(t.params * _exact(b) for t, b in zip(targets, picked))),
        total_params=total,
    )


def targets_from_rows(rows: Sequence[Mapping[str, Any]], side: str = "weight") -> list[Target]:
    """Targets from sensitivity-table rows (SENSITIVITY_COLUMNS; strings from a CSV are
    fine) of one `side`, in the table's order. Errors name the row (1-based) and field."""
    if side not in ALLOCATION_SIDES:
        raise ValueError(f"side={side!r} is not allowed; choose one of {', '.join(ALLOCATION_SIDES)}")
    targets: dict[str, tuple[int, dict[float, float]]] = {}
    for i, row in enumerate(rows, start=1):
        missing = [c for c in ("match", "side", "bits", "params", "delta") if row.get(c) in (None, "")]
        if missing:
            raise ValueError(f"sensitivity row {i}: no {missing[0]!r}; columns are {', '.join(SENSITIVITY_COLUMNS)}")
        if row["side"] != side:
            continue
        try:
            b, params, delta = parse_bits(float(row["bits"])), int(row["params"]), float(row["delta"])
        except ValueError as err:
            raise ValueError(f"sensitivity row {i}: {err}") from None
        known_params, sens = targets.setdefault(str(row["match"]), (params, {}))
        if known_params != params:
            raise ValueError(f"sensitivity row {i}: {row['match']!r} has params={params}, earlier rows {known_params}")
        sens[b] = delta
    if not targets:
        raise ValueError(f"the sensitivity table has no rows with side={side!r}; measure with --side {side}")
    return [Target(match, params, sens) for match, (params, sens) in targets.items()]


def allocation_rules(allocation: Allocation, side: str = "weight") -> list[LayerRule]:
    """The choice as quant.rules: one rule per target, setting its weight bits (side=both:
    its input bits too), so the result does not depend on the preset's own quant.bits."""
    rules = []
    for match, b in allocation.bits.items():
        fields = {"bits": b}
        rules.append(LayerRule(match, weight=fields, activation=fields if side == "both" else {}))
    return rules
