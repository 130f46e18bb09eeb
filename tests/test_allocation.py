"""The bit allocator: optimal against brute force on random instances, exact at the budget
edge, ties to less memory, one-line errors; its rules resolve on the model."""

import itertools
import math
import random

import pytest

from qat.quant.allocation import Target, allocate, allocation_rules, targets_from_rows
from qat.quant.config import QuantizerConfig
from qat.quant.rules import format_rules, parse_rules, resolve_layers

BITS = (2, 3, 4, 8)


def brute_force(targets, budget, bits):
    """The least summed sensitivity over every choice within the budget (inf if none)."""
    total = sum(t.params for t in targets)
    best = math.inf
    for choice in itertools.product(bits, repeat=len(targets)):
        if sum(t.params * b for t, b in zip(targets, choice)) <= budget * total + 1e-9:
            best = min(best, sum(t.sensitivity[b] for t, b in zip(targets, choice)))
    return best


def random_instance(rng, n=6, bits=BITS):
    targets = []
    for i in range(n):
        params = 128 * rng.choice([128, 384, 512, 1000, 77])  # unequal sizes: a real knapsack
        # Loss rises as bits fall, with noise that can make a wider width slightly worse.
        sens = {b: rng.uniform(0, 1) * 2.0 ** (-b) * rng.choice([1, 10]) + rng.gauss(0, 0.002) for b in bits}
        targets.append(Target(f"layers.{i}.x", params, sens))
    return targets


@pytest.mark.parametrize("seed", range(25))
def test_allocation_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    bits = BITS if seed % 5 else (1.58, 2, 3, 4)  # fractional widths too
    targets = random_instance(rng, bits=bits)
    budget = rng.uniform(min(bits), max(bits))
    result = allocate(targets, budget, bits)
    total = sum(t.params for t in targets)
    assert result.memory_bits <= budget * total + 1e-6 and result.total_params == total
    assert math.isclose(result.memory_bits, sum(t.params * result.bits[t.match] for t in targets))
    assert math.isclose(result.predicted_increase, sum(t.sensitivity[result.bits[t.match]] for t in targets))
    assert math.isclose(result.predicted_increase, brute_force(targets, budget, bits), abs_tol=1e-12)


def test_budget_edge_is_inclusive_and_ties_take_less_memory():
    t = [Target("a", 100, {2: 1.0, 4: 0.0}), Target("b", 300, {2: 1.0, 4: 0.0})]
    assert allocate(t, 2.5, (2, 4)).bits == {"a": 4, "b": 2}  # exactly 2.5 bits/param fits
    assert allocate(t, 2.49, (2, 4)).bits == {"a": 2, "b": 2}
    flat = [Target("a", 100, {2: 0.5, 4: 0.5})]
    assert allocate(flat, 4.0, (2, 4)).bits == {"a": 2}  # equal loss: the narrower width
    assert allocate(t, 8.0, (2, 4)).bits == {"a": 4, "b": 4}  # a loose budget takes the best everywhere


@pytest.mark.parametrize(
    "targets, budget, bits, message",
    [
        ([Target("a", 10, {2: 0.1})], 1.0, (2,), "budget=1 bits/param is below the narrowest candidate width 2"),
        ([Target("a", 10, {2: 0.1})], 3.0, (2, 4), "target 'a' has no sensitivity at 4 bits"),
        ([Target("a", 0, {2: 0.1})], 3.0, (2,), "params=0 must be a positive integer"),
        ([Target("a", 10, {2: float("nan")})], 3.0, (2,), "sensitivity at 2 bits is nan"),
        ([], 3.0, (2,), "no targets"),
        ([Target("a", 10, {2: 0.1})], 3.0, (9,), "bits=9 is not allowed"),
    ],
)
def test_bad_input_is_a_one_line_error(targets, budget, bits, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        allocate(targets, budget, bits)


def test_rows_to_rules_that_resolve():
    rows = [{"match": m, "layers": "1", "side": "weight", "bits": str(b), "params": str(p), "loss": "3.0", "delta": str(d)}
            for m, p in (("layers.0.mlp.down", 49152), ("layers.*.attn.qkv", 98304))
            for b, d in ((2, 0.3 if "down" in m else 0.01), (4, 0.0))]  # fmt: skip
    rows.append({**rows[0], "side": "activation"})  # another side's rows are ignored
    targets = targets_from_rows(rows)
    assert [(t.match, t.params, sorted(t.sensitivity)) for t in targets] == [("layers.0.mlp.down", 49152, [2, 4]), ("layers.*.attn.qkv", 98304, [2, 4])]
    result = allocate(targets, 3.0, (2, 4))
    assert result.bits == {"layers.0.mlp.down": 4, "layers.*.attn.qkv": 2}
    rules = parse_rules([r.to_dict() for r in allocation_rules(result)])
    names = ["layers.0.attn.qkv", "layers.1.attn.qkv", "layers.0.mlp.down"]
    resolved = resolve_layers(names, QuantizerConfig(bits=3), QuantizerConfig(bits=3), rules)
    assert {n: (q.weight.bits, q.activation.bits) for n, q in resolved.items()} == {names[0]: (2, 3), names[1]: (2, 3), names[2]: (4, 3)}
    both = format_rules(allocation_rules(result, side="both"))
    assert both.startswith('[{match: "layers.0.mlp.down", weight: {bits: 4}, activation: {bits: 4}}')
    with pytest.raises(ValueError, match="no rows with side='both'"):
        targets_from_rows(rows, side="both")
    with pytest.raises(ValueError, match="sensitivity row 1: no 'delta'"):
        targets_from_rows([{**rows[0], "delta": ""}])
