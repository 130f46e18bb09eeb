"""Fit a precision-aware scaling law L(N, D, P) to training runs and report it.

    python scripts/fit_scaling_law.py --runs runs.csv --out fit.json --plots figs/
    python scripts/fit_scaling_law.py --runs outputs/ --out fit.json          # collect on the fly
    python scripts/fit_scaling_law.py --runs quest_runs.json --format quest --out fit.json

Prints the parameters with bootstrap CIs, eff(P) and eff(P) * 16 / bits(P) per precision,
the fit error and the leave-one-size-out error; writes all of it to --out as JSON.
Bad input exits with status 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from typing import Any, Sequence

from qat.io import atomic_write_text
from qat.scaling.results import FORMATS, load_runs
from qat.scaling.runs import Run
from qat.scaling.law import LAWS, MIN_SIZES_FOR_LOSO, ScalingFit, bootstrap_fit, fit_scaling_law, leave_one_size_out, validate_runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="runs CSV (collect_results.py), a directory of results.json, or the QuEST JSON")
    ap.add_argument("--out", required=True, help="fit JSON to write")
    ap.add_argument("--format", default="auto", choices=FORMATS, help="input format (auto: directory/.csv/.json)")
    ap.add_argument("--law", default="quest", choices=LAWS)
    ap.add_argument("--starts", type=int, default=1024, help="multi-start size of the fit")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for CIs (0: none)")
    ap.add_argument("--loso-starts", type=int, default=128, help="fresh starts per leave-one-size-out fold (0: skip LOSO)")
    ap.add_argument("--huber-delta", type=float, default=1e-2, help="Huber threshold on log-loss residuals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--include-incomplete", action="store_true", help="also fit failed/running runs that report a loss")
    ap.add_argument("--plots", default=None, help="directory for PNG figures")
    return ap.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if args.starts < 1:
        raise ValueError(f"--starts={args.starts} must be >= 1")
    if args.bootstrap != 0 and args.bootstrap < 2:
        raise ValueError(f"--bootstrap={args.bootstrap} must be 0 (none) or >= 2")
    if args.loso_starts < 0:
        raise ValueError(f"--loso-starts={args.loso_starts} must be >= 0")
    if not (math.isfinite(args.huber_delta) and args.huber_delta > 0):
        raise ValueError(f"--huber-delta={args.huber_delta} must be a finite number > 0")


def build_report(runs: Sequence[Run], fit: ScalingFit, boot: dict[str, Any] | None, loso: dict[str, Any] | None, seconds: float, source: str) -> dict[str, Any]:
    report = fit.to_dict()
    bits = {k: fit.memory_bits.get(k) for k in fit.eff}  # None: the runs recorded no memory bits
    report.update(
        memory_bits=bits,
        eff_per_bit={k: (v * 16 / bits[k] if bits[k] else None) for k, v in fit.eff.items()},
        precision_counts=dict(sorted(Counter(r.precision for r in runs).items())),
        ci=boot["ci"] if boot else None,
        bootstrap={k: v for k, v in boot.items() if k != "ci"} if boot else None,
        loso=loso,
        fit_seconds=seconds,
        source=source,
    )
    return report


def _ci_text(interval: Sequence[float] | None, fmt: str) -> str:
    return f"[{interval[0]:{fmt}}, {interval[1]:{fmt}}]" if interval else "-"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3f}%"


def format_report(rep: dict[str, Any]) -> str:
    ci = rep["ci"] or {}
    lines = [
        f"{rep['law']} law fit to {rep['n_runs']} runs ({len(rep['eff'])} precisions): {rep['n_starts']} starts in "
        f"{rep['fit_seconds']:.1f} s, Huber delta {rep['huber_delta']:g}",
        "",
        f"{'param':<10}{'value':>14}  95% CI",
    ]
    for name in ("A", "alpha", "B", "beta", "E"):
        lines.append(f"{name:<10}{rep[name]:>14.6g}  {_ci_text(ci.get(name), '.4g')}")
    for name, value in rep["law_params"].items():
        lines.append(f"{name:<10}{value:>14.6g}  {_ci_text(ci.get('law_params', {}).get(name), '.4g')}")
    lines += ["", f"{'precision':<12}{'runs':>5}{'bits':>6}{'eff':>9}  {'95% CI':<18}{'eff*16/bits':>12}"]
    for key in sorted(rep["eff"], key=lambda k: (-(rep["memory_bits"][k] or 0), k)):
        bits, per_bit = rep["memory_bits"][key], rep["eff_per_bit"][key]
        lines.append(
            f"{key:<12}{rep['precision_counts'].get(key, 0):>5}{(f'{bits:g}' if bits else '?'):>6}{rep['eff'][key]:>9.4f}  "
            f"{_ci_text(ci.get('eff', {}).get(key), '.3f'):<18}{(f'{per_bit:.3f}' if per_bit else '-'):>12}"
        )
    lines += ["", f"fit error: mean |L_hat/L - 1| {100 * rep['mean_rel_error']:.3f}%, max {100 * rep['max_rel_error']:.3f}%"]
    if rep["bootstrap"] and any(rep["bootstrap"]["dropped"].values()):
        dropped = ", ".join(f"{k} {n}" for k, n in rep["bootstrap"]["dropped"].items() if n)
        lines.append(f"bootstrap: {rep['bootstrap']['n_boot']} resamples; resamples missing a precision (its eff skipped): {dropped}")
    loso = rep["loso"]
    if loso:
        lines.append(f"leave-one-size-out: mean {_pct(loso['mean_rel_error'])}, max {_pct(loso['max_rel_error'])}")
        for fold in loso["folds"]:
            label = f" ({fold['size_label']})" if fold["size_label"] else ""
            skipped = f", {fold['n_skipped']} unpredictable" if fold["n_skipped"] else ""
            lines.append(f"  N={fold['N']:.4g}{label}: {fold['n_runs']} runs, mean {_pct(fold['mean_rel_error'])}, max {_pct(fold['max_rel_error'])}{skipped}")
    return "\n".join(lines)


def run(args: argparse.Namespace, skipped: list[str]) -> dict[str, Any]:
    """The fit and its report; the files and rows that load_runs skips are collected in
    `skipped` and printed as warnings once the runs are known to be fit-able."""
    _check_args(args)
    runs = load_runs(args.runs, args.format, args.include_incomplete, warn=skipped.append)
    validate_runs(runs, args.law)  # before any fitting work
    for warning in skipped:
        print(f"warning: {warning}", file=sys.stderr)
    start = time.perf_counter()
    fit = fit_scaling_law(runs, law=args.law, n_starts=args.starts, seed=args.seed, huber_delta=args.huber_delta)
    seconds = time.perf_counter() - start
    boot = bootstrap_fit(runs, fit, n_boot=args.bootstrap, seed=args.seed) if args.bootstrap else None
    n_sizes = len({r.N for r in runs})
    loso = None
    if args.loso_starts and n_sizes >= MIN_SIZES_FOR_LOSO:
        loso = leave_one_size_out(runs, fit, n_starts=args.loso_starts, seed=args.seed)
    elif args.loso_starts:
        print(f"note: leave-one-size-out skipped: {n_sizes} distinct N, need >= {MIN_SIZES_FOR_LOSO}", file=sys.stderr)
    report = build_report(runs, fit, boot, loso, seconds, str(args.runs))
    print(format_report(report))
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    if args.plots:
        from qat.scaling.plots import write_plots  # matplotlib only when figures are asked for

        for path in write_plots(runs, fit, report["ci"], args.plots):
            print(f"wrote {path}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    skipped: list[str] = []
    try:
        run(args, skipped)
    except ValueError as err:  # one line: the first file or row skipped may say why
        print(f"error: {err}{f' ({skipped[0]})' if skipped else ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
