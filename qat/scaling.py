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
from scipy.optimize import least_squares

LAWS = ("quest", "kumar")
REFERENCE = "bf16"  # eff = 1 by definition under the quest law
DEFAULT_HUBER_DELTA = 1e-2
MIN_SIZES_FOR_LOSO = 3  # with fewer distinct N, a fold has one size left and cannot see alpha
N_CORE = 5  # a_c, alpha, b_c, beta, E; law-specific parameters follow


@dataclass(frozen=True)
class Run:
    """One training run. w_bits/a_bits are only needed by the kumar law (16 = bf16)."""

    N: float  # non-embedding parameters
    D: float  # training tokens
    precision: str  # key, e.g. "bf16", "w4a4", "w4a16", "fp4", "2:4", "w4a4-nohad"
    loss: float  # final validation loss (nats/token)
    w_bits: float | None = None
    a_bits: float | None = None
    size_label: str | None = None


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


@dataclass
class _Problem:
    law: str
    keys: list[str]  # precision keys in the data, sorted
    free_keys: list[str]  # quest: keys with a free eff (all but bf16)
    log_n: np.ndarray  # (R,) centred log N
    log_d: np.ndarray  # (R,) centred log D
    log_l: np.ndarray  # (R,) log loss
    key_index: np.ndarray  # (R,) index into keys
    bits: dict[str, tuple[float, float]]  # key -> (w_bits, a_bits); kumar only
    w_bits: np.ndarray
    a_bits: np.ndarray
    c_n: float
    c_d: float
    lower: np.ndarray = field(init=False)
    upper: np.ndarray = field(init=False)
    init_lo: np.ndarray = field(init=False)
    init_hi: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        lmin, lmax, lmed = (float(f(self.log_l)) for f in (np.min, np.max, np.median))
        big = lmin - 25.0  # a term below e^-25 of the loss is numerically irrelevant
        core_lo = [big, 0.0, big, 0.0, 0.0]
        core_hi = [lmax + 5.0, 2.0, lmax + 5.0, 2.0, math.exp(lmax)]
        # Starting box: each power-law term between ~2% and 100% of a typical loss, exponents
        # 0.02-1, E between 0 and the smallest loss.
        init_lo = [lmed + math.log(0.02), 0.02, lmed + math.log(0.02), 0.02, 0.0]
        init_hi = [lmed, 1.0, lmed, 1.0, math.exp(lmin)]
        if self.law == "quest":
            k = len(self.free_keys)
            extra = ([math.log(1e-4)] * k, [math.log(4.0)] * k, [math.log(0.05)] * k, [0.0] * k)
        else:  # log gamma_w, log gamma_a (bits)
            extra = ([math.log(0.01)] * 2, [math.log(100.0)] * 2, [math.log(0.5)] * 2, [math.log(8.0)] * 2)
        self.lower = np.array(core_lo + extra[0])
        self.upper = np.array(core_hi + extra[1])
        self.init_lo = np.array(init_lo + extra[2])
        self.init_hi = np.array(init_hi + extra[3])

    @property
    def n_params(self) -> int:
        return len(self.lower)

    def log_eff(self, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-run log eff (S, R) and its Jacobian in the extra parameters.

        quest: the Jacobian is the same one-hot (R, k) run -> key matrix for every start
        (bf16 runs have an all-zero row); kumar: a dense (S, R, 2).
        """
        S, R = extra.shape[0], self.log_l.size
        if self.law == "quest":
            # bf16 reads a zero column appended after the free keys, so its log eff is 0.
            padded = np.concatenate([extra, np.zeros((S, 1))], axis=1)
            col = np.array([self.free_keys.index(k) if k != REFERENCE else len(self.free_keys) for k in self.keys])
            run_col = col[self.key_index]
            onehot = (run_col[:, None] == np.arange(len(self.free_keys))[None, :]).astype(float)
            return padded[:, run_col], onehot
        g = np.zeros((S, R))
        dg = np.zeros((S, R, 2))
        for j, bits in enumerate((self.w_bits, self.a_bits)):
            u = bits[None, :] / np.exp(extra[:, j : j + 1])  # P / gamma
            keep = -np.expm1(-u)  # 1 - exp(-P/gamma), the fraction of this factor kept
            g += np.log(keep)
            dg[..., j] = -u * np.exp(-u) / keep  # d/d(log gamma) of log(keep); no overflow
        return g, dg


def _make_problem(runs: Sequence[Run], law: str) -> _Problem:
    keys = sorted({r.precision for r in runs})
    log_n = np.log([float(r.N) for r in runs])
    log_d = np.log([float(r.D) for r in runs])
    c_n, c_d = float(log_n.mean()), float(log_d.mean())
    bits = {r.precision: (float(r.w_bits), float(r.a_bits)) for r in runs if r.w_bits is not None and r.a_bits is not None}
    return _Problem(
        law=law,
        keys=keys,
        free_keys=[k for k in keys if k != REFERENCE] if law == "quest" else [],
        log_n=log_n - c_n,
        log_d=log_d - c_d,
        log_l=np.log([float(r.loss) for r in runs]),
        key_index=np.array([keys.index(r.precision) for r in runs]),
        bits=bits,
        w_bits=np.array([np.nan if r.w_bits is None else float(r.w_bits) for r in runs]),  # kumar only
        a_bits=np.array([np.nan if r.a_bits is None else float(r.a_bits) for r in runs]),
        c_n=c_n,
        c_d=c_d,
    )


def _sum_by_key(v: np.ndarray, onehot: np.ndarray, axis: int) -> np.ndarray:
    """Sum v over the runs of each key (v's run axis `axis`) = v @ onehot, without BLAS:
    multi-threaded BLAS on these thin products is 10-100x slower on a busy machine."""
    if onehot.shape[1] == 0:  # only bf16 runs: no free eff
        shape = list(v.shape)
        shape[axis] = 0
        return np.zeros(shape)
    col = np.where(onehot.any(axis=1), onehot.argmax(axis=1), onehot.shape[1])
    order = np.argsort(col, kind="stable")[: int(onehot.any(axis=1).sum())]
    starts = np.searchsorted(col[order], np.arange(onehot.shape[1]))
    return np.add.reduceat(np.take(v, order, axis=axis), starts, axis=axis)


@dataclass
class _Jacobian:
    """dr/dtheta in factored form: core (S, R, 5), and for the law's parameters
    coef[..., None] * dlog_eff, where dlog_eff is (R, k) one-hot (quest) or (S, R, k)."""

    core: np.ndarray
    coef: np.ndarray
    dlog_eff: np.ndarray

    def dense(self) -> np.ndarray:
        extra = self.coef[..., None] * (self.dlog_eff if self.dlog_eff.ndim == 3 else self.dlog_eff[None])
        return np.concatenate([self.core, extra], axis=-1)

    def normal_equations(self, wr: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gradient J^T W r (S, P) and Gauss-Newton matrix J^T W J (S, P, P), W = diag(wr).

        The one-hot case never builds the (S, R, P) Jacobian: that halves a fit's time."""
        Jw = self.core * wr[..., None]
        H_cc = np.matmul(Jw.transpose(0, 2, 1), self.core)
        g_c = np.einsum("srp,sr->sp", Jw, r)
        cw = self.coef * wr
        if self.dlog_eff.ndim == 2:
            onehot = self.dlog_eff
            H_ce = _sum_by_key(Jw * self.coef[..., None], onehot, axis=1).transpose(0, 2, 1)
            H_ee = _sum_by_key(cw * self.coef, onehot, axis=1)[:, :, None] * np.eye(onehot.shape[1])
            g_e = _sum_by_key(cw * r, onehot, axis=1)
        else:
            Je = self.coef[..., None] * self.dlog_eff
            H_ce = np.matmul(Jw.transpose(0, 2, 1), Je)
            H_ee = np.matmul((Je * wr[..., None]).transpose(0, 2, 1), Je)
            g_e = np.einsum("srk,sr->sk", Je, wr * r)
        H = np.concatenate([np.concatenate([H_cc, H_ce], axis=2), np.concatenate([H_ce.transpose(0, 2, 1), H_ee], axis=2)], axis=1)
        return np.concatenate([g_c, g_e], axis=1), H


def _residuals(p: _Problem, theta: np.ndarray, jac: bool = False) -> tuple[np.ndarray, _Jacobian | None]:
    """r = log L - log L_hat for S parameter vectors at once: (S, R), and dr/dtheta."""
    a, alpha, b, beta, E = (theta[:, i : i + 1] for i in range(N_CORE))
    g, dg = p.log_eff(theta[:, N_CORE:])
    x = p.log_n[None, :] + g  # centred log(N * eff)
    t1 = np.exp(a - alpha * x)  # A / (N eff)^alpha
    t2 = np.exp(b - beta * p.log_d[None, :])  # B / D^beta
    l_hat = t1 + t2 + E
    r = p.log_l[None, :] - np.log(l_hat)
    if not jac:
        return r, None
    s1, s2 = t1 / l_hat, t2 / l_hat  # share of each term in L_hat
    core = np.stack([-s1, s1 * x, -s2, s2 * p.log_d[None, :], -1.0 / l_hat], axis=-1)
    return r, _Jacobian(core, s1 * alpha, dg)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber rho(r) and the IRLS weight psi(r)/r (1 inside delta, delta/|r| outside)."""
    a = np.abs(r)
    inside = a <= delta
    rho = np.where(inside, 0.5 * r * r, delta * (a - 0.5 * delta))
    return rho, np.where(inside, 1.0, delta / np.maximum(a, 1e-300))


def _cost(p: _Problem, theta: np.ndarray, weights: np.ndarray, delta: float) -> np.ndarray:
    return (weights * _huber(_residuals(p, theta)[0], delta)[0]).sum(axis=1)


def _batched_lm(p: _Problem, theta0: np.ndarray, weights: np.ndarray, delta: float, max_iter: int = 200, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Bounded Levenberg-Marquardt on S starts at once; weights (S, R) are per-start run weights.

    Bounds: coordinates sitting on a bound whose descent direction leaves the box are frozen
    for the step (an active set), the rest is solved and projected back into the box.
    """
    theta = np.clip(theta0, p.lower, p.upper).astype(float)
    S, P = theta.shape
    lam = np.full(S, 1e-3)
    cost = _cost(p, theta, weights, delta)
    todo = np.arange(S)
    eye = np.eye(P, dtype=bool)
    for _ in range(max_iter):
        if todo.size == 0:
            break
        th, w = theta[todo], weights[todo]
        r, J = _residuals(p, th, jac=True)
        _, irls = _huber(r, delta)
        grad, H = J.normal_equations(w * irls, r)
        frozen = ((th <= p.lower) & (grad > 0)) | ((th >= p.upper) & (grad < 0))
        diag = np.diagonal(H, axis1=1, axis2=2)
        damp = np.maximum(diag, 1e-9 * diag.max(axis=1, keepdims=True) + 1e-30)
        M = H + (lam[todo, None] * damp)[:, :, None] * eye
        M = np.where(frozen[:, :, None] | frozen[:, None, :], 0.0, M) + frozen[:, :, None] * eye
        step = np.linalg.solve(M, np.where(frozen, 0.0, -grad)[..., None])[..., 0]
        trial = np.clip(th + step, p.lower, p.upper)
        new_cost = _cost(p, trial, w, delta)
        ok = new_cost < cost[todo]
        gain = np.where(ok, cost[todo] - new_cost, 0.0)
        theta[todo[ok]] = trial[ok]
        cost[todo[ok]] = new_cost[ok]
        lam[todo] = np.where(ok, np.maximum(lam[todo] / 3, 1e-12), lam[todo] * 4)
        done = (ok & (gain <= rtol * (cost[todo] + 1e-30))) | (lam[todo] > 1e10)
        todo = todo[~done]
    return theta, cost


def _polish(p: _Problem, theta: np.ndarray, delta: float, rows: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """scipy trust-region least squares with a Huber loss from one start, on the selected runs."""
    rows = np.arange(p.log_l.size) if rows is None else rows
    span = p.upper - p.lower
    x0 = np.clip(theta, p.lower + 1e-9 * span, p.upper - 1e-9 * span)  # trf wants a strictly feasible start
    fit = least_squares(
        lambda x: _residuals(p, x[None])[0][0, rows],
        x0,
        jac=lambda x: _residuals(p, x[None], jac=True)[1].dense()[0, rows],
        bounds=(p.lower, p.upper),
        loss="huber",
        f_scale=delta,
        method="trf",
        x_scale="jac",
        ftol=1e-14,
        xtol=1e-14,
        gtol=1e-14,
        max_nfev=500,
    )
    # trf stays strictly inside the box; put coordinates within rounding of a bound onto it
    # (E = 0 reads better than E = 3e-31) and recompute the cost there.
    x = np.where(fit.x - p.lower < 1e-8 * span, p.lower, np.where(p.upper - fit.x < 1e-8 * span, p.upper, fit.x))
    weights = np.zeros(p.log_l.size)
    weights[rows] = 1.0
    return x, float(_cost(p, x[None], weights[None], delta)[0])


def _starts(p: _Problem, n: int, seed: int) -> np.ndarray:
    """Latin-hypercube starts in the initial box: every parameter's range is cut into n
    strata and each stratum is used once, so even few starts cover every axis. Seeded."""
    rng = np.random.default_rng(seed)
    strata = np.stack([rng.permutation(n) for _ in range(p.n_params)], axis=1)  # (n, P)
    unit = (strata + rng.random((n, p.n_params))) / n
    return p.init_lo + unit * (p.init_hi - p.init_lo)


# ---------------------------------------------------------------------------------------
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
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScalingFit":
        try:
            return cls(
                **{k: d[k] for k in ("law", "A", "alpha", "B", "beta", "E", "eff", "law_params", "cost", "huber_delta", "n_runs", "mean_rel_error", "max_rel_error")},
                bits={k: tuple(v) for k, v in d.get("bits", {}).items()},
                n_starts=d.get("n_starts", 0),
            )
        except KeyError as err:
            raise ValueError(f"fit is missing key {err.args[0]!r}; was it written by fit_scaling_law?") from None


def _theta_of(p: _Problem, fit: ScalingFit) -> np.ndarray:
    """A public fit as an internal parameter vector of problem p (warm starts)."""
    core = [math.log(fit.A) - fit.alpha * p.c_n, fit.alpha, math.log(fit.B) - fit.beta * p.c_d, fit.beta, fit.E]
    if p.law == "quest":
        extra = [math.log(fit.eff.get(k, 0.5)) for k in p.free_keys]
    else:
        extra = [math.log(fit.law_params["gamma_w"]), math.log(fit.law_params["gamma_a"])]
    return np.clip(np.array(core + extra), p.lower, p.upper)


def _public(p: _Problem, theta: np.ndarray) -> dict[str, Any]:
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


def _rel_errors(p: _Problem, theta: np.ndarray) -> np.ndarray:
    r, _ = _residuals(p, theta[None])
    return np.abs(np.expm1(-r[0]))  # L_hat / L - 1


def fit_scaling_law(runs: Sequence[Run], law: str = "quest", n_starts: int = 1024, seed: int = 0, huber_delta: float = DEFAULT_HUBER_DELTA, n_polish: int = 4) -> ScalingFit:
    """Multi-start robust fit; returns the lowest-cost optimum over all starts."""
    validate_runs(runs, law)
    if n_starts < 1 or n_polish < 1 or not huber_delta > 0:
        raise ValueError(f"n_starts={n_starts}, n_polish={n_polish} must be >= 1 and huber_delta={huber_delta} > 0")
    p = _make_problem(runs, law)
    theta, cost = _batched_lm(p, _starts(p, n_starts, seed), np.ones((n_starts, len(runs))), huber_delta)
    polished = [_polish(p, theta[i], huber_delta) for i in np.argsort(cost)[:n_polish]]
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
    p = _make_problem(runs, fit.law)
    rng = np.random.default_rng(seed)
    R = len(runs)
    counts = np.stack([np.bincount(rng.integers(0, R, R), minlength=R) for _ in range(n_boot)]).astype(float)
    theta, _ = _batched_lm(p, np.repeat(_theta_of(p, fit)[None], n_boot, axis=0), counts, fit.huber_delta)
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
    p = _make_problem(runs, fit.law)
    sizes = np.unique(p.log_n)
    if sizes.size < MIN_SIZES_FOR_LOSO:
        raise ValueError(f"leave-one-size-out needs >= {MIN_SIZES_FOR_LOSO} distinct N; got {sizes.size}")
    per_fold = n_starts + 1
    theta0 = np.concatenate([np.concatenate([_theta_of(p, fit)[None], _starts(p, n_starts, seed + 1 + f)]) for f in range(sizes.size)])
    train = np.repeat(np.stack([p.log_n != s for s in sizes]), per_fold, axis=0).astype(float)
    theta, cost = _batched_lm(p, theta0, train, fit.huber_delta)
    folds, all_err = [], []
    for f, s in enumerate(sizes):
        block = slice(f * per_fold, (f + 1) * per_fold)
        rows = np.flatnonzero(p.log_n != s)
        best = min((_polish(p, theta[block][i], fit.huber_delta, rows) for i in np.argsort(cost[block])[:n_polish]), key=lambda tc: tc[1])[0]
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
