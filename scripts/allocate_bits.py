"""Per-layer weight bits under a memory budget, from a sensitivity table: the exact minimum
of the summed measured loss increase (qat/quant/allocation.py), written as quant.rules.

    python scripts/allocate_bits.py --sensitivity sens.csv --budget-bits-per-param 3.0 --out rules.yaml
    python scripts/allocate_bits.py --sensitivity sens.csv --budget-bits-per-param 3.0 --bits 2 3 4 8 --out rules.yaml
    python train.py quant.bits=3 quant.rules="$(cat rules.yaml)"      # train the allocation

The budget is on weight memory: sum of params x bits over the targets <= budget x their
params. rules.yaml is one line of flow-style YAML (a list of rules), which Hydra also reads
as an override value; each rule sets one target's weight bits (--side both: input bits
too), so the result does not depend on the preset's own quant.bits.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence

from qat.io import atomic_write_text
from qat.quant.allocation import ALLOCATION_SIDES, allocate, allocation_rules, targets_from_rows
from qat.quant.rules import format_rules


def read_rows(path: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError as err:
        raise ValueError(f"--sensitivity {path!r} cannot be read: {err.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"--sensitivity {path!r} is not a CSV file ({err}); give the CSV of scripts/layer_sensitivity.py") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sensitivity", required=True, help="CSV from scripts/layer_sensitivity.py")
    p.add_argument("--budget-bits-per-param", required=True, type=float, help="mean weight bits allowed, e.g. 3.0")
    p.add_argument("--bits", nargs="+", type=float, default=None, help="candidate widths (default: every width in the table)")
    p.add_argument("--side", choices=ALLOCATION_SIDES, default="weight", help="the table's rows to use, and the rules' side(s)")
    p.add_argument("--out", required=True, help="quant.rules YAML to write")
    args = p.parse_args(argv)
    try:
        targets = targets_from_rows(read_rows(args.sensitivity), args.side)
        bits = [int(b) if float(b).is_integer() else b for b in args.bits] if args.bits else sorted({b for t in targets for b in t.sensitivity})
        result = allocate(targets, args.budget_bits_per_param, bits)
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    width = max(len(t.match) for t in targets)
    print(f"{'target':<{width}}  {'params':>11}  bits  {'loss increase':>13}")
    for t in targets:
        b = result.bits[t.match]
        print(f"{t.match:<{width}}  {t.params:>11,}  {b:>4g}  {t.sensitivity[b]:>+13.4f}")
    print(
        f"predicted loss increase {result.predicted_increase:+.4f} (sum over targets); weight memory "
        f"{result.bits_per_param:.3f} bits/param (budget {args.budget_bits_per_param:g}) = "
        f"{result.memory_bits / 8 / 2**20:.3f} MiB over {result.total_params:,} params"
    )
    atomic_write_text(args.out, format_rules(allocation_rules(result, args.side)) + "\n")
    print(f"wrote {args.out}; train it with: python train.py quant.rules=\"$(cat {args.out})\" ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
