"""Scaling-law figures as PNG: loss vs memory, eff(P) per precision, Pareto frontier.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so this works headless
and never changes the process-wide backend.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qat.io import atomic_write
from qat.scaling.law import ScalingFit, memory_bits_of
from qat.scaling.runs import Run


def precision_order(keys: Sequence[str], fit: ScalingFit) -> list[str]:
    """bf16, then W = A keys, formats and weight-only keys, then method variants ("-nohad",
    ...), each group from many bits to few (bits as the runs recorded them)."""

    def rank(key: str) -> tuple[int, float, str]:
        w_bits, a_bits = fit.bits.get(key, (None, None))
        if key == "bf16":
            family = 0
        elif "-" in key:
            family = 3
        else:
            family = 1 if w_bits is not None and w_bits == a_bits else 2
        return family, -fit.memory_bits.get(key, 0.0), key

    return sorted(keys, key=rank)


def pareto_front(memory: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of runs that no other run beats on both axes (less memory and lower loss),
    sorted by memory."""
    order = np.lexsort((loss, memory))
    front, best = [], np.inf
    for i in order:
        if loss[i] < best:
            front.append(i)
            best = loss[i]
    return np.array(front, dtype=int)


def _colors(keys: Sequence[str]) -> dict[str, Any]:
    cmap = colormaps["tab20"]
    return {k: cmap(i % 20) for i, k in enumerate(keys)}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def _near(ratio: float, other: float) -> bool:
    return abs(other / ratio - 1) <= 0.1


def _cluster(values: Sequence[float]) -> tuple[int, float]:
    """(size, median) of the largest group of values within 10% of each other (ties go to
    the larger value)."""
    counts = [(sum(_near(x, y) for y in values), x) for x in values]
    size, center = max(counts)
    return size, float(np.median([y for y in values if _near(center, y)]))


def _main_sequence(runs: Sequence[Run]) -> tuple[str, float]:
    """How most runs of a precision chose their token budget: ("D/N", ratio) when D grows
    with N (the QuEST tables), ("D", tokens) when every size saw the same D (fixed-budget
    sweeps such as cpu_demo). The fitted curve is drawn along it."""
    by_ratio = _cluster([r.D / r.N for r in runs])
    by_tokens = _cluster([r.D for r in runs])
    return ("D", by_tokens[1]) if by_tokens[0] > by_ratio[0] else ("D/N", by_ratio[1])


def plot_loss_vs_memory(runs: Sequence[Run], fit: ScalingFit, path: str | Path) -> Path:
    """Measured loss vs N x bits, one colour per precision, with the fitted curve along each
    precision's main sequence (a typical D/N, or a fixed D; filled markers: runs on it,
    hollow: the others)."""
    keys = precision_order(sorted({r.precision for r in runs}), fit)
    colors = _colors(keys)
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    for key in keys:
        group = [r for r in runs if r.precision == key]
        bits, (kind, value) = memory_bits_of(fit, key), _main_sequence(group)
        N = np.array([r.N for r in group])
        on_curve = np.array([_near(value, r.D / r.N if kind == "D/N" else r.D) for r in group])
        mem, loss = N * bits / 1e6, np.array([r.loss for r in group])
        ax.scatter(mem[on_curve], loss[on_curve], color=colors[key], s=22, zorder=3)
        ax.scatter(mem[~on_curve], loss[~on_curve], facecolors="none", edgecolors=colors[key], s=22, zorder=3)
        grid = np.geomspace(N.min() / 1.3, N.max() * 1.3, 60)
        tokens = value * grid if kind == "D/N" else np.full_like(grid, value)
        label = f"{key} (D/N={value:.0f})" if kind == "D/N" else f"{key} (D={value:.3g})"
        ax.plot(grid * bits / 1e6, fit.predict(grid, tokens, key), color=colors[key], lw=1.2, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("model memory N x bits (Mbit)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{fit.law} law: mean |rel. error| {100 * fit.mean_rel_error:.2f}%")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, Path(path))


def plot_efficiency(fit: ScalingFit, ci: dict[str, Any] | None, path: str | Path) -> Path:
    """eff(P) and eff(P) * 16 / bits(P) (capacity per stored bit relative to bf16), with
    bootstrap CIs as error bars when given."""
    keys = precision_order(list(fit.eff), fit)
    eff = np.array([fit.eff[k] for k in keys])
    per_bit = np.array([16.0 / memory_bits_of(fit, k) for k in keys])
    intervals = (ci or {}).get("eff", {})
    lo = np.array([intervals.get(k, [v, v])[0] for k, v in zip(keys, eff)])
    hi = np.array([intervals.get(k, [v, v])[1] for k, v in zip(keys, eff)])
    colors = _colors(keys)
    fig = Figure(figsize=(10, 4.2))
    x = np.arange(len(keys))
    for j, (scale, label) in enumerate([(np.ones_like(eff), "eff(P)"), (per_bit, "eff(P) x 16 / bits(P)")]):
        ax = fig.add_subplot(1, 2, j + 1)
        yerr = np.stack([(eff - lo) * scale, (hi - eff) * scale]).clip(min=0)
        ax.bar(x, eff * scale, yerr=yerr if intervals else None, capsize=2, color=[colors[k] for k in keys])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, keys, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{fit.law} law: parameter efficiency per precision" + (" (95% bootstrap CI)" if intervals else ""))
    return _save(fig, Path(path))


def plot_pareto(runs: Sequence[Run], fit: ScalingFit, path: str | Path) -> Path:
    """Measured loss vs memory; runs on the Pareto frontier are highlighted and labelled."""
    keys = precision_order(sorted({r.precision for r in runs}), fit)
    colors = _colors(keys)
    mem = np.array([r.N * memory_bits_of(fit, r.precision) / 1e6 for r in runs])
    loss = np.array([r.loss for r in runs])
    front = pareto_front(mem, loss)
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    for key in keys:
        idx = [i for i, r in enumerate(runs) if r.precision == key]
        ax.scatter(mem[idx], loss[idx], color=colors[key], s=16, alpha=0.45, label=key)
    ax.step(mem[front], loss[front], where="post", color="k", lw=1.2, label="Pareto frontier")
    ax.scatter(mem[front], loss[front], s=70, facecolors="none", edgecolors="k", lw=1.5, zorder=4)
    for i in front:
        ax.annotate(runs[i].precision, (mem[i], loss[i]), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("model memory N x bits (Mbit)")
    ax.set_ylabel("final validation loss")
    ax.set_title("loss vs memory: Pareto frontier of measured runs")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, Path(path))


def write_plots(runs: Sequence[Run], fit: ScalingFit, ci: dict[str, Any] | None, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    return [
        plot_loss_vs_memory(runs, fit, out / "loss_vs_memory.png"),
        plot_efficiency(fit, ci, out / "efficiency.png"),
        plot_pareto(runs, fit, out / "pareto.png"),
    ]
