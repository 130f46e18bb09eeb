"""Collect every run's results.json under one or more roots into one tidy CSV.

    python scripts/collect_results.py outputs/ multirun/ --out runs.csv

One row per run (columns: qat.scaling.results.RESULT_COLUMNS). Unreadable or malformed files are
warned about on stderr and skipped; failed/running runs are kept (status column) and left
out of fits by default; a run directory reached through two roots appears once; reruns of
one configuration (precision, preset, model, tokens, seed) keep the newest completed run.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Sequence

from qat.scaling.results import collect_results, write_results_csv


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", help="directories searched recursively for results.json")
    ap.add_argument("--out", required=True, help="CSV to write (atomically)")
    args = ap.parse_args(argv)
    skipped: list[str] = []
    rows = collect_results(args.roots, warn=skipped.append)
    if not rows:  # one line: the first file or root that was skipped says why
        why = f" ({skipped[0]})" if skipped else ""
        print(f"error: no readable results.json under {', '.join(args.roots)}{why}; give run directories of train.py (or folders of them)", file=sys.stderr)
        return 2
    for warning in skipped:
        print(f"warning: {warning}", file=sys.stderr)
    write_results_csv(rows, args.out)
    status = Counter(r["status"] for r in rows)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
    print(f"wrote {len(rows)} runs ({summary}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
