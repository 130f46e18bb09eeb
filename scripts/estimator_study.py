"""Turn an estimator sweep (sweep=estimators_cpu / estimators_30m) into the study's table and plots.

    python scripts/estimator_study.py multirun/estimators_cpu --out docs/estimators_cpu

Groups completed runs by (estimator, rotation, bits) and reports, over seeds, the mean and a
95% confidence interval (Student t, n - 1 degrees of freedom) of the final validation loss and
of the final gradient alignment (mean cosine between the quantized and the full-precision
gradient over layers). Writes study.md (the table), study.json, loss_vs_bits.png and
alignment_vs_bits.png into --out.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from qat.io import atomic_write, atomic_write_json, atomic_write_text
from qat.scaling.results import find_result_files

ESTIMATOR_ORDER = ("trust", "ste", "clip", "lsq", "pact")


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided t interval, n); half-width nan for n < 2."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n), n


def study_rows(roots: Sequence[str], warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per (estimator, rotation, bits) over the completed runs under the roots; a file
    that is not a results.json of train.py is passed to `warn` and skipped."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: {"loss": [], "cos": []})
    for path in find_result_files(roots, warn):
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
            if r.get("status") != "completed":
                continue
            w = r["quantization"]["weight"]
            key = (str(w["estimator"]), str(w["rotation"]), float(w["bits"]))
            loss = float(r["val_loss"])
            cos = (r.get("grad_alignment") or {}).get("align/mean_cos")
            cos = None if cos is None else float(cos)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, not an object, a field missing
            warn(f"{path} is not a results.json of train.py ({type(err).__name__}: {' '.join(str(err).split())[:100]}); skipped")
            continue
        groups[key]["loss"].append(loss)
        if cos is not None:
            groups[key]["cos"].append(cos)
    rows = []
    for (estimator, rotation, bits), g in groups.items():
        loss, loss_ci, n = mean_ci(g["loss"])
        cos, cos_ci, _ = mean_ci(g["cos"]) if g["cos"] else (math.nan, math.nan, 0)
        rows.append({"estimator": estimator, "rotation": rotation, "bits": bits, "seeds": n, "val_loss": loss, "val_loss_ci95": loss_ci, "align_cos": cos, "align_cos_ci95": cos_ci})
    order = {e: i for i, e in enumerate(ESTIMATOR_ORDER)}
    return sorted(rows, key=lambda r: (-r["bits"], order.get(r["estimator"], 99), r["rotation"]))


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| bits | estimator | rotation | seeds | final val loss (95% CI) | alignment cos (95% CI) |", "|---|---|---|---|---|---|"]
    for r in rows:
        cos = "n/a" if math.isnan(r["align_cos"]) else f"{r['align_cos']:.3f} ± {r['align_cos_ci95']:.3f}"
        lines.append(f"| {r['bits']:g} | {r['estimator']} | {r['rotation']} | {r['seeds']} | {r['val_loss']:.4f} ± {r['val_loss_ci95']:.4f} | {cos} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], metric: str, ylabel: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for estimator in ESTIMATOR_ORDER:
        for rotation, style in (("hadamard", "-"), ("none", "--")):
            pts = sorted((r["bits"], r[metric], r[f"{metric}_ci95"]) for r in rows if r["estimator"] == estimator and r["rotation"] == rotation)
            pts = [p for p in pts if not math.isnan(p[1])]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                            linestyle=style, marker="o", capsize=3, label=f"{estimator}, {rotation}")  # fmt: skip
    ax.set_xlabel("bits (weights and activations)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", help="sweep directories holding results.json files")
    ap.add_argument("--out", required=True, help="directory for study.md, study.json and the plots")
    args = ap.parse_args(argv)
    skipped: list[str] = []
    rows = study_rows(args.roots, skipped.append)
    if not rows:  # one line: the first file or root that was skipped says why
        why = f" ({skipped[0]})" if skipped else ""
        print(f"error: no completed runs under {', '.join(args.roots)}{why}; give sweep directories holding results.json of train.py", file=sys.stderr)
        return 2
    for warning in skipped:
        print(f"warning: {warning}", file=sys.stderr)
    out = Path(args.out)
    table = markdown(rows)
    atomic_write_text(out / "study.md", table)
    atomic_write_json(out / "study.json", rows)
    plot(rows, "val_loss", "final validation loss (mean over seeds, 95% CI)", out / "loss_vs_bits.png")
    plot(rows, "align_cos", "gradient alignment cos(g_q, g_fp)", out / "alignment_vs_bits.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
