"""Scaling laws of final loss against model size N, training tokens D and precision P.

Both laws share one shape, L = A / (N * eff)^alpha + B / D^beta + E:
- "quest" (QuEST, arXiv 2502.05003): one free eff per precision key, eff("bf16") = 1.
- "kumar" (Kumar et al., "Scaling Laws for Precision", arXiv 2411.04330): the effective
  parameter count N * (1 - exp(-P_w/gamma_w)) * (1 - exp(-P_a/gamma_a)) from the run's
  weight/activation bits (16 for bf16), with gamma_w, gamma_a fitted. It has no per-format
  term: fp4, 2:4 and no-Hadamard runs count only by their bits, so every 4/4-bit format
  shares one eff. (The paper's KV-cache factor is left out: we do not quantize the cache.)

Fit: Huber loss on log residuals r = log L - log L_hat. The default delta = 0.01 (a 1%
relative error) is ~4x the typical residual of a good fit (0.2-0.3% on the QuEST table),
so clean runs are fitted by least squares while one diverged or mislabelled run (errors of
several %) pulls only linearly. Many starts run at once through a batched, bounded
Levenberg-Marquardt (IRLS for Huber); the best few are polished with
scipy.optimize.least_squares(loss="huber") and the lowest cost is kept (the published
notebook kept the last start, a bug).

Parameters: log A, log B and log eff (positive by construction), alpha, beta in [0, 2], eff
in [1e-4, 4]. Internally the intercepts are centred, a_c = log A - alpha * mean(log N) (b_c
likewise): this decorrelates (a, alpha) and (b, beta), which are otherwise ~99.9% collinear.
E alone is fitted on a linear scale, E in [0, max L]: on the QuEST table its optimum sits at
the bound E -> 0 (the floor is not identified by these runs), and in log E every solver
crawls towards -inf by a few % per iteration. The public ScalingFit holds plain A, B, E.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from qat.scaling.runs import Run
from qat.scaling.solver import N_CORE, REFERENCE, Problem, batched_lm, make_problem, polish, residuals, starts

LAWS = ("quest", "kumar")
DEFAULT_HUBER_DELTA = 1e-2
MIN_SIZES_FOR_LOSO = 3  # with fewer distinct N, a fold has one size left and cannot see alpha


def _is_positive_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def validate_runs(runs: Sequence[Run], law: str = "quest") -> None:
    """Raise a one-line ValueError on anything a fit cannot use, before any fitting work."""
    if law not in LAWS:
        raise ValueError(f"law={law!r} is not allowed; choose one of {', '.join(map(repr, LAWS))}")
    if len(runs) == 0:
        raise ValueError("no runs to fit; need at least two runs per precision and some bf16 runs")
    fields = ("N", "D", "loss") + (("w_bits", "a_bits") if law == "kumar" else ())
    for i, run in enumerate(runs):
        for name in fields:
            value = getattr(run, name)
            if not _is_positive_number(value):
                raise ValueError(f"run {i}: {name}={value!r} must be a finite number > 0")
        if not isinstance(run.precision, str) or not run.precision:
            raise ValueError(f"run {i}: precision={run.precision!r} must be a non-empty string")
    counts = Counter(r.precision for r in runs)
    if law == "kumar":  # the law reads bits per run, but eff and predict() are per key
        seen: dict[str, tuple[Any, Any]] = {}
        for i, run in enumerate(runs):
            first = seen.setdefault(run.precision, (run.w_bits, run.a_bits))
            if first != (run.w_bits, run.a_bits):
                raise ValueError(f"run {i}: precision {run.precision!r} has bits {(run.w_bits, run.a_bits)}, earlier runs of it {first}; one key must be one format")
    if law == "quest":
        if REFERENCE not in counts:
            raise ValueError(f"the quest law needs {REFERENCE!r} runs as the eff = 1 reference; got {sorted(counts)}")
        for key, n in sorted(counts.items()):
            if key != REFERENCE and n < 2:
                raise ValueError(f"precision {key!r} has {n} run; need >= 2 to fit its eff")
    n_params = N_CORE + (len(counts) - 1 if law == "quest" else 2)
    if len(runs) <= n_params:
        raise ValueError(f"{len(runs)} runs cannot determine {n_params} parameters of the {law} law")


# ---------------------------------------------------------------------------------------
# The problem: data as arrays plus the law's extra parameters (per-key log eff or log gamma).


# Public result and API.


@dataclass(frozen=True)
class ScalingFit:
    """A fitted law. eff maps every precision key to its factor on N (kumar: derived from bits)."""

    law: str
    A: float
    alpha: float
    B: float
    beta: float
    E: float
    eff: dict[str, float]
    law_params: dict[str, float]  # kumar: gamma_w, gamma_a; quest: empty
    bits: dict[str, tuple[float, float]]  # key -> (w_bits, a_bits) as seen in the data
    cost: float  # Huber cost at the optimum
    huber_delta: float
    n_runs: int
    mean_rel_error: float
    max_rel_error: float
    n_starts: int = 0
    memory_bits: dict[str, float] = field(default_factory=dict)  # key -> stored bits per weight, from the runs
    start_costs: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    def predict(self, N: Any, D: Any, precision: str | Sequence[str]) -> np.ndarray:
        """Predicted loss; N, D broadcast, precision is one key or one key per element."""
        keys = [precision] if isinstance(precision, str) else list(precision)
        unknown = sorted(set(keys) - set(self.eff))
        if unknown:
            raise ValueError(f"precision {unknown[0]!r} is not in this fit; known: {', '.join(sorted(self.eff))}")
        eff = np.array([self.eff[k] for k in keys]).reshape(np.shape(precision) if not isinstance(precision, str) else ())
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.A / (N * eff) ** self.alpha + self.B / D**self.beta + self.E

    def to_dict(self) -> dict[str, Any]:
        keys = ("law", "A", "alpha", "B", "beta", "E", "eff", "law_params", "cost", "huber_delta", "n_runs", "mean_rel_error", "max_rel_error", "n_starts")
        out = {k: getattr(self, k) for k in keys}
        out["bits"] = {k: list(v) for k, v in self.bits.items()}
        out["memory_bits"] = dict(self.memory_bits)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScalingFit":
        if not isinstance(d, dict):
            raise ValueError(f"a fit is a JSON object written by fit_scaling_law, got a {type(d).__name__}")
        try:
            return cls(
                **{k: d[k] for k in ("law", "A", "alpha", "B", "beta", "E", "eff", "law_params", "cost", "huber_delta", "n_runs", "mean_rel_error", "max_rel_error")},
                bits={k: tuple(v) for k, v in d.get("bits", {}).items()},
                n_starts=d.get("n_starts", 0),
                memory_bits=dict(d.get("memory_bits") or {}),
            )
        except KeyError as err:
            raise ValueError(f"fit is missing key {err.args[0]!r}; was it written by fit_scaling_law?") from None


def _theta_of(p: Problem, fit: ScalingFit) -> np.ndarray:
    """A public fit as an internal parameter vector of problem p (warm starts)."""
    core = [math.log(fit.A) - fit.alpha * p.c_n, fit.alpha, math.log(fit.B) - fit.beta * p.c_d, fit.beta, fit.E]
    if p.law == "quest":
        extra = [math.log(fit.eff.get(k, 0.5)) for k in p.free_keys]
    else:
        extra = [math.log(fit.law_params["gamma_w"]), math.log(fit.law_params["gamma_a"])]
    return np.clip(np.array(core + extra), p.lower, p.upper)


def _public(p: Problem, theta: np.ndarray) -> dict[str, Any]:
    a, alpha, b, beta, E = (float(v) for v in theta[:N_CORE])
    out: dict[str, Any] = {"A": math.exp(a + alpha * p.c_n), "alpha": alpha, "B": math.exp(b + beta * p.c_d), "beta": beta, "E": E}
    if p.law == "quest":
        out["eff"] = {REFERENCE: 1.0, **{k: math.exp(v) for k, v in zip(p.free_keys, theta[N_CORE:])}}
        out["law_params"] = {}
    else:
        gw, ga = np.exp(theta[N_CORE:])
        out["eff"] = {k: float(-np.expm1(-w / gw) * -np.expm1(-a_ / ga)) for k, (w, a_) in p.bits.items()}
        out["law_params"] = {"gamma_w": float(gw), "gamma_a": float(ga)}
    return out


def _rel_errors(p: Problem, theta: np.ndarray) -> np.ndarray:
    r, _ = residuals(p, theta[None])
    return np.abs(np.expm1(-r[0]))  # L_hat / L - 1


def memory_bits_by_key(runs: Sequence[Run]) -> dict[str, float]:
    """Stored bits per weight of each precision key, as the runs recorded them."""
    return {r.precision: float(r.memory_bits) for r in runs if r.memory_bits is not None}


def memory_bits_of(fit: ScalingFit, key: str) -> float:
    if key not in fit.memory_bits:
        raise ValueError(f"precision {key!r} has no recorded memory bits in this fit; known: {', '.join(sorted(fit.memory_bits)) or 'none'}")
    return fit.memory_bits[key]


def fit_scaling_law(runs: Sequence[Run], law: str = "quest", n_starts: int = 1024, seed: int = 0, huber_delta: float = DEFAULT_HUBER_DELTA, n_polish: int = 4) -> ScalingFit:
    """Multi-start robust fit; returns the lowest-cost optimum over all starts."""
    validate_runs(runs, law)
    if n_starts < 1 or n_polish < 1 or not huber_delta > 0:
        raise ValueError(f"n_starts={n_starts}, n_polish={n_polish} must be >= 1 and huber_delta={huber_delta} > 0")
    p = make_problem(runs, law)
    theta, cost = batched_lm(p, starts(p, n_starts, seed), np.ones((n_starts, len(runs))), huber_delta)
    polished = [polish(p, theta[i], huber_delta) for i in np.argsort(cost)[:n_polish]]
    best, best_cost = min(polished, key=lambda tc: tc[1])
    rel = _rel_errors(p, best)
    return ScalingFit(
        law=law,
        **_public(p, best),
        bits=p.bits,
        cost=best_cost,
        huber_delta=huber_delta,
        n_runs=len(runs),
        mean_rel_error=float(rel.mean()),
        max_rel_error=float(rel.max()),
        n_starts=n_starts,
        memory_bits=memory_bits_by_key(runs),
        start_costs=cost,
    )


def bootstrap_fit(runs: Sequence[Run], fit: ScalingFit, n_boot: int = 200, seed: int = 0, level: float = 95.0) -> dict[str, Any]:
    """Percentile CIs from refits on runs resampled with replacement (warm-started from fit).

    A resample is a vector of run counts, used as Huber weights, so all resamples are fitted in
    one batch. Under the quest law a resample without any run of a key cannot see that key's
    eff: the value is skipped for that resample and counted in "dropped" (a resample with no
    bf16 run leaves A and every eff unanchored and is skipped whole).
    Returns {"ci": {A, alpha, B, beta, E: [lo, hi], eff: {key: [lo, hi]}, law_params...}, ...}.
    """
    validate_runs(runs, fit.law)
    if n_boot < 2:
        raise ValueError(f"n_boot={n_boot} must be >= 2")
    p = make_problem(runs, fit.law)
    rng = np.random.default_rng(seed)
    R = len(runs)
    counts = np.stack([np.bincount(rng.integers(0, R, R), minlength=R) for _ in range(n_boot)]).astype(float)
    theta, _ = batched_lm(p, np.repeat(_theta_of(p, fit)[None], n_boot, axis=0), counts, fit.huber_delta)
    key_seen = np.stack([np.bincount(p.key_index, weights=c, minlength=len(p.keys)) > 0 for c in counts])
    samples: dict[str, list[float]] = {}
    dropped = {k: int((~key_seen[:, i]).sum()) for i, k in enumerate(p.keys)} if fit.law == "quest" else {}
    for s in range(n_boot):
        if fit.law == "quest" and not key_seen[s, p.keys.index(REFERENCE)]:
            continue
        pub = _public(p, theta[s])
        for name in ("A", "alpha", "B", "beta", "E"):
            samples.setdefault(name, []).append(pub[name])
        for k, v in pub["eff"].items():
            if fit.law != "quest" or key_seen[s, p.keys.index(k)]:
                samples.setdefault(f"eff:{k}", []).append(v)
        for k, v in pub["law_params"].items():
            samples.setdefault(f"law:{k}", []).append(v)
    lo_q, hi_q = (100 - level) / 2, 100 - (100 - level) / 2
    interval = {k: [float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))] for k, v in samples.items()}
    ci: dict[str, Any] = {k: v for k, v in interval.items() if ":" not in k}
    ci["eff"] = {k.split(":", 1)[1]: v for k, v in interval.items() if k.startswith("eff:")}
    ci["law_params"] = {k.split(":", 1)[1]: v for k, v in interval.items() if k.startswith("law:")}
    return {"ci": ci, "n_boot": n_boot, "level": level, "dropped": dropped, "seed": seed}


def leave_one_size_out(runs: Sequence[Run], fit: ScalingFit, n_starts: int = 128, seed: int = 0, n_polish: int = 2) -> dict[str, Any]:
    """For each distinct N: refit without its runs, predict them, report relative errors.

    All folds run in one batch (held-out runs get weight 0), each from the full fit plus
    n_starts fresh starts. Held-out runs whose precision has no run left in the fold cannot
    be predicted under the quest law and are counted in n_skipped.
    """
    validate_runs(runs, fit.law)
    p = make_problem(runs, fit.law)
    sizes = np.unique(p.log_n)
    if sizes.size < MIN_SIZES_FOR_LOSO:
        raise ValueError(f"leave-one-size-out needs >= {MIN_SIZES_FOR_LOSO} distinct N; got {sizes.size}")
    per_fold = n_starts + 1
    theta0 = np.concatenate([np.concatenate([_theta_of(p, fit)[None], starts(p, n_starts, seed + 1 + f)]) for f in range(sizes.size)])
    train = np.repeat(np.stack([p.log_n != s for s in sizes]), per_fold, axis=0).astype(float)
    theta, cost = batched_lm(p, theta0, train, fit.huber_delta)
    folds, all_err = [], []
    for f, s in enumerate(sizes):
        block = slice(f * per_fold, (f + 1) * per_fold)
        rows = np.flatnonzero(p.log_n != s)
        best = min((polish(p, theta[block][i], fit.huber_delta, rows) for i in np.argsort(cost[block])[:n_polish]), key=lambda tc: tc[1])[0]
        held = np.flatnonzero(p.log_n == s)
        seen = set(p.key_index[rows])
        ok = np.array([fit.law != "quest" or p.key_index[i] in seen for i in held], dtype=bool)
        err = _rel_errors(p, best)[held[ok]]
        all_err.extend(err)
        labels = {runs[i].size_label for i in held} - {None}
        folds.append({
            "N": float(runs[held[0]].N),
            "size_label": labels.pop() if len(labels) == 1 else None,
            "n_runs": int(held.size),
            "n_skipped": int((~ok).sum()),
            "mean_rel_error": float(err.mean()) if err.size else None,
            "max_rel_error": float(err.max()) if err.size else None,
        })
    all_err = np.array(all_err)
    return {
        "folds": folds,
        "mean_rel_error": float(all_err.mean()) if all_err.size else None,
        "max_rel_error": float(all_err.max()) if all_err.size else None,
    }
