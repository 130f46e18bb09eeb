"""The numerical core of the scaling-law fit: residuals with an analytic Jacobian, a
batched bounded Levenberg-Marquardt over many starts at once, and a scipy polish.

See qat/scaling/law.py for the laws, the parametrisation and the public API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import least_squares

from qat.scaling.runs import Run

REFERENCE = "bf16"  # eff = 1 by definition under the quest law
N_CORE = 5  # a_c, alpha, b_c, beta, E; law-specific parameters follow


@dataclass
class Problem:
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


def make_problem(runs: Sequence[Run], law: str) -> Problem:
    keys = sorted({r.precision for r in runs})
    log_n = np.log([float(r.N) for r in runs])
    log_d = np.log([float(r.D) for r in runs])
    c_n, c_d = float(log_n.mean()), float(log_d.mean())
    bits = {r.precision: (float(r.w_bits), float(r.a_bits)) for r in runs if r.w_bits is not None and r.a_bits is not None}
    return Problem(
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
class Jacobian:
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


def residuals(p: Problem, theta: np.ndarray, jac: bool = False) -> tuple[np.ndarray, Jacobian | None]:
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
    return r, Jacobian(core, s1 * alpha, dg)


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber rho(r) and the IRLS weight psi(r)/r (1 inside delta, delta/|r| outside)."""
    a = np.abs(r)
    inside = a <= delta
    rho = np.where(inside, 0.5 * r * r, delta * (a - 0.5 * delta))
    return rho, np.where(inside, 1.0, delta / np.maximum(a, 1e-300))


def huber_cost(p: Problem, theta: np.ndarray, weights: np.ndarray, delta: float) -> np.ndarray:
    return (weights * huber(residuals(p, theta)[0], delta)[0]).sum(axis=1)


def batched_lm(p: Problem, theta0: np.ndarray, weights: np.ndarray, delta: float, max_iter: int = 200, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Bounded Levenberg-Marquardt on S starts at once; weights (S, R) are per-start run weights.

    Bounds: coordinates sitting on a bound whose descent direction leaves the box are frozen
    for the step (an active set), the rest is solved and projected back into the box.
    """
    theta = np.clip(theta0, p.lower, p.upper).astype(float)
    S, P = theta.shape
    lam = np.full(S, 1e-3)
    cost = huber_cost(p, theta, weights, delta)
    todo = np.arange(S)
    eye = np.eye(P, dtype=bool)
    for _ in range(max_iter):
        if todo.size == 0:
            break
        th, w = theta[todo], weights[todo]
        r, J = residuals(p, th, jac=True)
        _, irls = huber(r, delta)
        grad, H = J.normal_equations(w * irls, r)
        frozen = ((th <= p.lower) & (grad > 0)) | ((th >= p.upper) & (grad < 0))
        diag = np.diagonal(H, axis1=1, axis2=2)
        damp = np.maximum(diag, 1e-9 * diag.max(axis=1, keepdims=True) + 1e-30)
        M = H + (lam[todo, None] * damp)[:, :, None] * eye
        M = np.where(frozen[:, :, None] | frozen[:, None, :], 0.0, M) + frozen[:, :, None] * eye
        step = np.linalg.solve(M, np.where(frozen, 0.0, -grad)[..., None])[..., 0]
        trial = np.clip(th + step, p.lower, p.upper)
        new_cost = huber_cost(p, trial, w, delta)
        ok = new_cost < cost[todo]
        gain = np.where(ok, cost[todo] - new_cost, 0.0)
        theta[todo[ok]] = trial[ok]
        cost[todo[ok]] = new_cost[ok]
        lam[todo] = np.where(ok, np.maximum(lam[todo] / 3, 1e-12), lam[todo] * 4)
        done = (ok & (gain <= rtol * (cost[todo] + 1e-30))) | (lam[todo] > 1e10)
        todo = todo[~done]
    return theta, cost


def polish(p: Problem, theta: np.ndarray, delta: float, rows: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """scipy trust-region least squares with a Huber loss from one start, on the selected runs."""
    rows = np.arange(p.log_l.size) if rows is None else rows
    span = p.upper - p.lower
    x0 = np.clip(theta, p.lower + 1e-9 * span, p.upper - 1e-9 * span)  # trf wants a strictly feasible start
    fit = least_squares(
        lambda x: residuals(p, x[None])[0][0, rows],
        x0,
        jac=lambda x: residuals(p, x[None], jac=True)[1].dense()[0, rows],
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
    return x, float(huber_cost(p, x[None], weights[None], delta)[0])


def starts(p: Problem, n: int, seed: int) -> np.ndarray:
    """Latin-hypercube starts in the initial box: every parameter's range is cut into n
    strata and each stratum is used once, so even few starts cover every axis. Seeded."""
    rng = np.random.default_rng(seed)
    strata = np.stack([rng.permutation(n) for _ in range(p.n_params)], axis=1)  # (n, P)
    unit = (strata + rng.random((n, p.n_params))) / n
    return p.init_lo + unit * (p.init_hi - p.init_lo)


# ---------------------------------------------------------------------------------------
