"""Which precision and model size minimise the predicted loss at a fixed memory budget?

    python scripts/advise_precision.py --fit fit.json --memory-bits 1e9 --tokens 1e10
    python scripts/advise_precision.py --fit fit.json --memory-bits 1e9 --tokens-per-param 100

For each precision P of the fit: N = memory / bits(P) parameters (bits of stored weights:
16 bf16, 4 fp4, 2.5 for 2:4, b for w<b>a<c>), D tokens (fixed, or tokens-per-param x N),
and the fitted law's loss at (N, D, P); rows are sorted by predicted loss.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

from qat.scaling.law import ScalingFit, memory_bits_of


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def read_fit(path: str) -> ScalingFit:
    """The fit JSON of scripts/fit_scaling_law.py; one ValueError line naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            return ScalingFit.from_dict(json.load(f))
    except OSError as err:
        raise ValueError(f"--fit {path!r} cannot be read: {err.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--fit {path!r} is not JSON ({err}); give the fit JSON written by scripts/fit_scaling_law.py") from None
    except ValueError as err:
        raise ValueError(f"--fit {path!r}: {err}") from None


def advise(fit: ScalingFit, budget_bits: float, tokens: float | None, tokens_per_param: float | None, precisions: Sequence[str] | None) -> list[dict[str, Any]]:
    keys = list(precisions) if precisions else sorted(fit.eff)
    unknown = [k for k in keys if k not in fit.eff]
    if unknown:
        raise ValueError(f"precision {unknown[0]!r} is not in the fit; known: {', '.join(sorted(fit.eff))}")
    rows = []
    for key in keys:
        bits = memory_bits_of(fit, key)
        N = budget_bits / bits
        D = tokens if tokens is not None else tokens_per_param * N
        rows.append({"precision": key, "bits": bits, "N": N, "D": D, "loss": float(fit.predict(N, D, key))})
    return sorted(rows, key=lambda r: r["loss"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", required=True, help="fit JSON from fit_scaling_law.py")
    ap.add_argument("--memory-bits", required=True, type=_positive, help="weight memory budget in bits, e.g. 8e9")
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--tokens", type=_positive, help="training tokens D, the same for every precision")
    data.add_argument("--tokens-per-param", type=_positive, help="D = this x N (N differs per precision)")
    ap.add_argument("--precisions", nargs="+", default=None, help="keys to compare (default: all in the fit)")
    args = ap.parse_args(argv)
    try:
        fit = read_fit(args.fit)
        rows = advise(fit, args.memory_bits, args.tokens, args.tokens_per_param, args.precisions)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data_text = f"D = {args.tokens:.3g} tokens" if args.tokens else f"D = {args.tokens_per_param:g} x N tokens"
    print(f"memory budget {args.memory_bits:.3g} bits, {data_text}, {fit.law} law")
    print(f"{'precision':<12}{'bits':>6}{'N (params)':>13}{'D (tokens)':>13}{'pred. loss':>12}")
    for r in rows:
        print(f"{r['precision']:<12}{r['bits']:>6g}{r['N']:>13.3e}{r['D']:>13.3e}{r['loss']:>12.4f}")
    best = rows[0]
    print(f"best: {best['precision']} with N = {best['N']:.3e} parameters, D = {best['D']:.3e} tokens (predicted loss {best['loss']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
