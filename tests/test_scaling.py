"""Scaling-law fitter: recovery of known parameters, CIs, LOSO, validation, the QuEST table, CLIs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qat.scaling.law as scaling
from qat.scaling.results import load_quest_runs
from qat.scaling import solver as scaling_solver
from qat.scaling.runs import Run
from qat.scaling.law import ScalingFit, bootstrap_fit, fit_scaling_law, leave_one_size_out, validate_runs

REPO = Path(__file__).resolve().parents[1]
QUEST_TABLE = REPO.parent / "shared" / "data" / "quest_runs_for_scaling.json"
needs_quest = pytest.mark.skipif(not QUEST_TABLE.exists(), reason=f"published QuEST run table not found at {QUEST_TABLE}")

# Chinchilla-like constants; eff values like QuEST's 8/4/2-bit fits.
TRUE = {"A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28, "E": 1.69}
TRUE_EFF = {"bf16": 1.0, "w8a8": 0.95, "w4a4": 0.7, "w2a2": 0.15}
KUMAR = {"gamma_w": 2.5, "gamma_a": 2.0}
KUMAR_BITS = {"bf16": (16, 16), "w8a8": (8, 8), "w4a4": (4, 4), "w3a3": (3, 3), "w2a2": (2, 2), "w4a16": (4, 16)}
SIZES = (3e7, 5e7, 1e8, 2e8, 4e8, 8e8)


def law(N: float, D: float, eff: float) -> float:
    return TRUE["A"] / (N * eff) ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"] + TRUE["E"]


def kumar_eff(w: float, a: float) -> float:
    return (1 - math.exp(-w / KUMAR["gamma_w"])) * (1 - math.exp(-a / KUMAR["gamma_a"]))


def synthetic_runs(noise: float = 0.0, seed: int = 0, kumar: bool = False) -> list[Run]:
    """Every precision at 6 sizes, D/N = 100, plus D/N = 25 and 50 at the 4 smaller sizes;
    multiplicative log-normal noise of relative size `noise`."""
    rng = np.random.default_rng(seed)
    keys = KUMAR_BITS if kumar else TRUE_EFF
    runs = []
    for key in keys:
        w, a = KUMAR_BITS.get(key, (None, None))
        eff = kumar_eff(w, a) if kumar else TRUE_EFF[key]
        for i, N in enumerate(SIZES):
            for ratio in (25, 50, 100) if i < 4 else (100,):
                loss = law(N, ratio * N, eff) * math.exp(noise * rng.standard_normal())
                runs.append(Run(N=N, D=ratio * N, precision=key, loss=loss, w_bits=w, a_bits=a, size_label=f"{N:.0e}"))
    return runs


# --- numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("law_name", ["quest", "kumar"])
def test_jacobian_matches_finite_differences(law_name):
    runs = synthetic_runs(kumar=True)
    p = scaling_solver.make_problem(runs, law_name)
    theta = scaling_solver.starts(p, 3, seed=1)
    _, J = scaling_solver.residuals(p, theta, jac=True)
    eps = 1e-6
    fd = np.stack([(scaling_solver.residuals(p, theta + eps * e)[0] - scaling_solver.residuals(p, theta - eps * e)[0]) / (2 * eps) for e in np.eye(p.n_params)], axis=-1)
    np.testing.assert_allclose(J.dense(), fd, atol=1e-7)
    w, r = np.random.default_rng(0).random(fd.shape[:2]), scaling_solver.residuals(p, theta)[0]
    grad, H = J.normal_equations(w, r)
    np.testing.assert_allclose(grad, np.einsum("srp,sr->sp", fd, w * r), atol=1e-7)
    np.testing.assert_allclose(H, np.einsum("srp,sr,srq->spq", fd, w, fd), atol=1e-6)


def test_zero_noise_recovers_parameters_exactly():
    fit = fit_scaling_law(synthetic_runs(), n_starts=256)
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-6), name
    for key, value in TRUE_EFF.items():
        assert fit.eff[key] == pytest.approx(value, rel=1e-6), key
    assert fit.max_rel_error < 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_recovery_within_tolerance(seed):
    # 0.1% noise: observed deviations over 10 seeds are alpha 0.002, beta 0.004, E 0.009,
    # eff 1.1%; the tolerances leave ~3x margin.
    fit = fit_scaling_law(synthetic_runs(noise=1e-3, seed=seed), n_starts=256)
    assert abs(fit.alpha - TRUE["alpha"]) < 0.01
    assert abs(fit.beta - TRUE["beta"]) < 0.015
    assert abs(fit.E - TRUE["E"]) < 0.03
    for key, value in TRUE_EFF.items():
        assert fit.eff[key] == pytest.approx(value, rel=0.03), key
    assert 5e-4 < fit.mean_rel_error < 2e-3  # ~ the noise level: neither under- nor over-fit


def test_predict_is_the_law_and_vectorised():
    fit = fit_scaling_law(synthetic_runs(), n_starts=64)
    N, D = np.array([1e8, 2e8, 4e8]), np.array([1e10, 3e10, 5e10])
    got = fit.predict(N, D, ["bf16", "w4a4", "w2a2"])
    want = [law(n, d, TRUE_EFF[k]) for n, d, k in zip(N, D, ["bf16", "w4a4", "w2a2"])]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert fit.predict(N[:, None], D[None, :], "w4a4").shape == (3, 3)
    with pytest.raises(ValueError, match="'w5a5' is not in this fit"):
        fit.predict(1e8, 1e10, "w5a5")
    assert ScalingFit.from_dict(json.loads(json.dumps(fit.to_dict()))).predict(1e8, 1e10, "w4a4") == pytest.approx(float(fit.predict(1e8, 1e10, "w4a4")))


def test_best_start_is_polished_and_kept(monkeypatch):
    polished = []
    original = scaling_solver.polish
    monkeypatch.setattr(scaling, "polish", lambda p, theta, delta, rows=None: polished.append(theta.copy()) or original(p, theta, delta, rows))
    runs = synthetic_runs(noise=1e-3)
    fit = fit_scaling_law(runs, n_starts=64, n_polish=1)
    costs = fit.start_costs
    assert costs.size == 64 and costs.argmin() != costs.size - 1  # keeping the last start would differ
    p = scaling_solver.make_problem(runs, "quest")
    theta, _ = scaling_solver.batched_lm(p, scaling_solver.starts(p, 64, 0), np.ones((64, len(runs))), fit.huber_delta)
    np.testing.assert_array_equal(polished[0], theta[costs.argmin()])
    assert fit.cost <= costs.min() * (1 + 1e-9)


def test_kumar_law_recovers_gammas():
    fit = fit_scaling_law(synthetic_runs(noise=1e-3, kumar=True), law="kumar", n_starts=256)
    assert fit.law_params["gamma_w"] == pytest.approx(KUMAR["gamma_w"], rel=0.06)
    assert fit.law_params["gamma_a"] == pytest.approx(KUMAR["gamma_a"], rel=0.06)
    assert abs(fit.alpha - TRUE["alpha"]) < 0.01
    assert fit.eff["w4a16"] == pytest.approx(kumar_eff(4, 16), rel=0.02)
    exact = fit_scaling_law(synthetic_runs(kumar=True), law="kumar", n_starts=128)
    assert exact.law_params["gamma_w"] == pytest.approx(KUMAR["gamma_w"], rel=1e-6)


# --- bootstrap and leave-one-size-out --------------------------------------------------------


def test_bootstrap_intervals_cover_the_truth():
    # 10 synthetic data sets x (alpha, beta, E, 3 effs): observed coverage 97% at nominal 95%.
    covered, widths = [], []
    for seed in range(10):
        runs = synthetic_runs(noise=1e-3, seed=seed)
        ci = bootstrap_fit(runs, fit_scaling_law(runs, n_starts=128, seed=seed), n_boot=200, seed=seed)["ci"]
        truth = [(ci["alpha"], TRUE["alpha"]), (ci["beta"], TRUE["beta"]), (ci["E"], TRUE["E"])]
        truth += [(ci["eff"][k], v) for k, v in TRUE_EFF.items() if k != "bf16"]
        covered += [lo <= v <= hi for (lo, hi), v in truth]
        widths.append(ci["eff"]["w4a4"][1] / ci["eff"]["w4a4"][0] - 1)
    assert np.mean(covered) >= 0.85
    assert max(widths) < 0.1  # informative, not just wide


def test_bootstrap_skips_a_key_missing_from_a_resample():
    runs = synthetic_runs(noise=1e-3)
    rare = [r for r in runs if r.precision == "w8a8"][:2]  # keep only 2 w8a8 runs
    runs = [r for r in runs if r.precision != "w8a8"] + rare
    out = bootstrap_fit(runs, fit_scaling_law(runs, n_starts=64), n_boot=200, seed=0)
    # P(a resample has none of 2 runs out of R) = (1 - 2/R)^R ~ e^-2: about 27 of 200.
    assert 10 <= out["dropped"]["w8a8"] <= 50
    assert out["dropped"]["w4a4"] == 0
    lo, hi = out["ci"]["eff"]["w8a8"]
    assert lo <= hi and np.isfinite([lo, hi]).all()


def test_leave_one_size_out():
    runs = synthetic_runs()
    exact = leave_one_size_out(runs, fit_scaling_law(runs, n_starts=64), n_starts=16)
    assert [f["N"] for f in exact["folds"]] == list(SIZES)
    assert sum(f["n_runs"] for f in exact["folds"]) == len(runs)
    assert exact["max_rel_error"] < 1e-6  # noiseless: every held-out size is predicted exactly
    # A precision that exists at one size only cannot be predicted once that size is held out.
    lonely = [Run(N=1e8, D=d, precision="w3a3", loss=law(1e8, d, 0.4)) for d in (2.5e9, 1e10)]
    folds = leave_one_size_out(runs + lonely, fit_scaling_law(runs + lonely, n_starts=64), n_starts=16)["folds"]
    assert [f["n_skipped"] for f in folds] == [0, 0, 2, 0, 0, 0]
    with pytest.raises(ValueError, match="needs >= 3 distinct N"):
        two_sizes = [r for r in runs if r.N in SIZES[:2]]
        leave_one_size_out(two_sizes, fit_scaling_law(two_sizes, n_starts=8))


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda runs: [], "no runs to fit"),
        (lambda runs: runs + [Run(1e8, 1e10, "w3a3", 3.0)], "precision 'w3a3' has 1 run; need >= 2 to fit its eff"),
        (lambda runs: runs[:-1] + [Run(1e8, 1e10, "w4a4", -1.0)], r"run \d+: loss=-1.0 must be a finite number > 0"),
        (lambda runs: runs[:-1] + [Run(0, 1e10, "w4a4", 3.0)], r"run \d+: N=0 must be"),
        (lambda runs: runs[:-1] + [Run(1e8, float("nan"), "w4a4", 3.0)], r"run \d+: D=nan must be"),
        (lambda runs: runs[:-1] + [Run(1e8, "1e10", "w4a4", 3.0)], r"run \d+: D='1e10' must be"),
        (lambda runs: [r for r in runs if r.precision != "bf16"], "needs 'bf16' runs"),
    ],
)
def test_bad_runs_raise_one_line(edit, message):
    with pytest.raises(ValueError, match=message) as err:
        fit_scaling_law(edit(synthetic_runs()))
    assert "\n" not in str(err.value)


def test_kumar_needs_consistent_bits():
    with pytest.raises(ValueError, match=r"run 0: w_bits=None must be"):
        validate_runs([Run(r.N, r.D, r.precision, r.loss) for r in synthetic_runs()], "kumar")
    runs = synthetic_runs(kumar=True)
    runs[-1] = Run(runs[-1].N, runs[-1].D, runs[-1].precision, runs[-1].loss, w_bits=3, a_bits=16)
    with pytest.raises(ValueError, match=r"precision 'w4a16' has bits \(3, 16\), earlier runs of it \(4, 16\)"):
        validate_runs(runs, "kumar")


# --- the published QuEST table ---------------------------------------------------------------


@pytest.fixture(scope="module")
def quest_fit():
    runs = load_quest_runs(QUEST_TABLE)
    start = time.perf_counter()
    fit = fit_scaling_law(runs, n_starts=1024)
    return runs, fit, time.perf_counter() - start


@needs_quest
def test_quest_table_fit(quest_fit):
    runs, fit, seconds = quest_fit
    assert fit.n_starts >= 1000 and seconds <= 20.0
    assert fit.mean_rel_error < 0.005  # published fit: 0.27%
    assert 0.4 <= fit.eff["w4a4"] <= 1.0  # published: 0.69
    assert fit.eff["w1a1"] < fit.eff["w2a2"] < fit.eff["w3a3"] < fit.eff["w4a4"]
    # Hadamard helps at every bit width it was run at.
    for b in (1, 2, 3, 4, 8):
        assert fit.eff[f"w{b}a{b}-nohad"] < fit.eff[f"w{b}a{b}"]
    per_bit = {b: fit.eff[f"w{b}a{b}"] * 16 / b for b in (1, 2, 3, 4, 8)}
    assert max(per_bit, key=per_bit.get) == 4  # the paper's headline: 4-bit is the best per bit


@needs_quest
def test_quest_kumar_fit():
    fit = fit_scaling_law(load_quest_runs(QUEST_TABLE), law="kumar", n_starts=256)
    assert fit.mean_rel_error < 0.02  # no per-format term: worse than quest's 0.27%, still close
    assert fit.eff["w2a2"] < fit.eff["w4a4"] < fit.eff["w8a8"] < fit.eff["bf16"] <= 1.0


# --- command-line scripts --------------------------------------------------------------------


def _script_command(name: str, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return [sys.executable, str(REPO / "scripts" / name), *args], env


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    cmd, env = _script_command(name, *args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def load_script(name: str):
    """A script as a module, to call its main(argv) in-process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_results_tree(root: Path, runs: list[Run]) -> None:
    for i, r in enumerate(runs):
        run_dir = root / f"run{i:03d}"
        run_dir.mkdir(parents=True)
        result = {
            "status": "completed", "val_loss": r.loss, "val_ppl": math.exp(r.loss), "tokens": int(r.D),
            "non_embedding_params": int(r.N), "total_params": int(r.N) + 25_000_000, "model": r.size_label,
            "w_bits": r.w_bits, "a_bits": r.a_bits, "quant_preset": "quest", "precision": r.precision,
            "wall_time_s": 1.0, "step": 100, "seed": 0, "run_dir": str(run_dir), "overrides": [],
            "loss_floor": None, "unigram_loss": None,
        }  # fmt: skip
        (run_dir / "results.json").write_text(json.dumps(result))


def synthetic_tree(root: Path) -> list[Run]:
    runs = [r for r in synthetic_runs(noise=1e-3, kumar=True) if r.precision in ("bf16", "w4a4", "w2a2", "w4a16")]
    write_results_tree(root, runs)
    return runs


def check_fit_json(path: Path, law_name: str, n_runs: int) -> None:
    fit = json.loads(path.read_text())
    for key in ("A", "alpha", "B", "beta", "E", "eff", "ci", "law", "n_runs", "mean_rel_error", "loso"):
        assert key in fit, key
    assert fit["law"] == law_name and fit["n_runs"] == n_runs
    assert set(fit["ci"]["eff"]) == set(fit["eff"]) == {"bf16", "w4a4", "w2a2", "w4a16"}
    assert all(len(fit["ci"][k]) == 2 and fit["ci"][k][0] <= fit[k] <= fit["ci"][k][1] for k in ("alpha", "beta"))
    assert fit["mean_rel_error"] < 2e-3 and fit["loso"]["mean_rel_error"] < 5e-3


@pytest.mark.slow
def test_fit_cli_on_results_tree(tmp_path):
    runs = synthetic_tree(tmp_path / "outputs")
    out = tmp_path / "fit.json"
    proc = run_script("fit_scaling_law.py", "--runs", str(tmp_path / "outputs"), "--out", str(out),
                      "--starts", "64", "--bootstrap", "20", "--loso-starts", "8", "--plots", str(tmp_path / "figs"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    check_fit_json(out, "quest", len(runs))
    assert "eff*16/bits" in proc.stdout and "leave-one-size-out" in proc.stdout
    for name in ("loss_vs_memory.png", "efficiency.png", "pareto.png"):
        png = (tmp_path / "figs" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


def test_fit_cli_kumar_law(tmp_path, capsys):
    runs = synthetic_tree(tmp_path / "outputs")
    out = tmp_path / "fit.json"
    argv = ["--runs", str(tmp_path / "outputs"), "--out", str(out), "--law", "kumar", "--starts", "64", "--bootstrap", "20", "--loso-starts", "8"]
    assert load_script("fit_scaling_law.py").main(argv) == 0
    check_fit_json(out, "kumar", len(runs))
    assert "gamma_w" in capsys.readouterr().out


BAD_INPUT_HEADER = "status,precision,model,non_embedding_params,tokens,val_loss\n"
GOOD_ROWS = "".join(f"completed,{k},m{n},{n},{100 * n},{3.5 - 0.1 * i}\n" for k in ("bf16", "w4a4") for i, n in enumerate((1e7, 2e7, 4e7, 8e7)))
BAD_INPUTS = {
    "empty": (BAD_INPUT_HEADER, "no runs to fit"),
    "malformed": (BAD_INPUT_HEADER + GOOD_ROWS + "completed,w4a4,m,1e8,1e10,abc\n", "row 9: field 'val_loss'='abc' is not a number"),
    "single": (BAD_INPUT_HEADER + GOOD_ROWS + "completed,w3a3,m,1e8,1e10,3.0\n", "precision 'w3a3' has 1 run; need >= 2"),
    "negative": (BAD_INPUT_HEADER + GOOD_ROWS + "completed,w4a4,m,1e8,1e10,-3.0\n", "row 9: field 'val_loss'='-3.0' must be a finite number > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_fit_cli_rejects_bad_input(tmp_path, capsys, case):
    text, message = BAD_INPUTS[case]
    (tmp_path / "runs.csv").write_text(text)
    argv = ["--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "fit.json"), "--starts", "8"]
    assert load_script("fit_scaling_law.py").main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "fit.json").exists()


@pytest.mark.slow
def test_fit_cli_bad_input_exit_status(tmp_path):
    # The same path as above through a real interpreter: exit status and stderr of the process.
    text, message = BAD_INPUTS["malformed"]
    (tmp_path / "runs.csv").write_text(text)
    proc = run_script("fit_scaling_law.py", "--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "fit.json"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'runs.csv'} {message}"


@needs_quest
@pytest.mark.slow
def test_advise_precision_on_quest_fit(quest_fit, tmp_path):
    _, fit, _ = quest_fit
    (tmp_path / "fit.json").write_text(json.dumps(fit.to_dict()))
    keys = ["bf16", "w1a1", "w2a2", "w3a3", "w4a4", "w8a8"]
    proc = run_script("advise_precision.py", "--fit", str(tmp_path / "fit.json"), "--memory-bits", "1e9", "--tokens", "1e10", "--precisions", *keys)
    assert proc.returncode == 0, proc.stderr
    # At a fixed D the data term is the same for every precision, so the ranking is the
    # ranking of eff(P) / bits(P): QuEST's 4-bit wins (the paper's Pareto claim).
    order = sorted(keys, key=lambda k: -fit.eff[k] / fit.memory_bits[k])
    listed = [line.split()[0] for line in proc.stdout.splitlines()[2:-1]]
    assert listed == order and order[0] == "w4a4"
    best = float(fit.predict(2.5e8, 1e10, "w4a4"))
    assert f"best: w4a4 with N = 2.500e+08 parameters, D = 1.000e+10 tokens (predicted loss {best:.4f})" in proc.stdout
    bad = run_script("advise_precision.py", "--fit", str(tmp_path / "fit.json"), "--memory-bits", "0", "--tokens", "1e10")
    assert bad.returncode != 0 and "must be a finite number > 0" in bad.stderr


def test_plot_curves_follow_the_sweeps_token_budget():
    from qat.scaling.plots import _main_sequence

    sizes = [2e5, 4e5, 1.6e6]
    fixed = [Run(N=n, D=4e5, precision="w4a4", loss=1.0) for n in sizes]
    assert _main_sequence(fixed) == ("D", 4e5)
    proportional = [Run(N=n, D=100 * n, precision="w4a4", loss=1.0) for n in sizes] + [Run(N=1e6, D=2.5e7, precision="w4a4", loss=1.0)]
    assert _main_sequence(proportional) == ("D/N", 100.0)
