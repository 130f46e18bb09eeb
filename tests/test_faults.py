"""Runs that survive faults: divergence, signals, corrupt or stale checkpoints, resume checks,
failing re-runs, and run directories that are a function of the command."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, run_train

pytestmark = pytest.mark.slow
FAST = ("model=debug-xs", "telemetry.every=0")


def _results(run_dir):
    text = (run_dir / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    return json.loads(text)


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_divergence_stops_keeps_finite_checkpoints_and_exits_nonzero(tmp_path):
    proc = run_train(tmp_path, *FAST, "trainer.max_steps=40", "optimizer.lr=1e3", "checkpoint.every_n_steps=2", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: training diverged at step ")
    r = _results(tmp_path)
    assert r["status"] == "diverged" and r.get("val_loss") is None and r["step"] < 40 and r["diverged_at_step"] == r["step"]
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        assert all(torch.isfinite(v).all() for v in _weights(ckpt).values() if v.is_floating_point()), ckpt


def _start(run_dir, *overrides):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((run_dir / "results.json").read_text()).get("step", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"run did not reach step {step}")


SIGNAL_RUN = (*FAST, "trainer.max_steps=30", "checkpoint.every_n_steps=1", "checkpoint.keep_all=false")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    run_train(run_dir, *SIGNAL_RUN)
    return _weights(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_the_current_step_and_the_same_command_resumes_identically(tmp_path, signum, uninterrupted):
    overrides = SIGNAL_RUN
    proc = _start(tmp_path / "cut", *overrides)
    _wait_for_step(tmp_path / "cut", 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"{signal.Signals(signum).name} received: saved a checkpoint at step" in err.strip().splitlines()[-1]
    r = _results(tmp_path / "cut")
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert r["status"] == "interrupted" and r["step"] == saved >= 3
    resumed = run_train(tmp_path / "cut", *overrides)
    assert f"resumed from step {saved}" in resumed.stdout
    whole, cut = uninterrupted, _weights(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    r = _results(tmp_path / "cut")
    assert r["status"] == "completed" and r["train_time_s"] > 0 and r["resumed_from_step"] == saved


def test_resume_falls_back_from_a_corrupt_checkpoint_and_removes_stale_temp_files(tmp_path):
    run_train(tmp_path, *FAST, "trainer.max_steps=6", "checkpoint.every_n_steps=3")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(os.urandom(1000))
    stale = tmp_path / "checkpoints" / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"half")
    proc = run_train(tmp_path, *FAST, "trainer.max_steps=8", "checkpoint.every_n_steps=3")
    assert "last.ckpt' is unreadable" in proc.stdout and "resumed from step 6" in proc.stdout
    assert not stale.exists() and _results(tmp_path)["step"] == 8


def test_resume_refuses_a_different_quantization_and_keeps_the_completed_result(tmp_path):
    run_train(tmp_path, *FAST, "trainer.max_steps=4")
    before = (tmp_path / "results.json").read_text()
    proc = run_train(tmp_path, *FAST, "trainer.max_steps=8", "quant.bits=2", check=False)
    assert proc.returncode == 2 and "was trained with a different quant.activation.bits, quant.bits, quant.weight.bits" in proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "results.json").read_text() == before
    proc = run_train(tmp_path, *FAST, "trainer.max_steps=8", "quant.weight.granularity=3", check=False)
    assert proc.returncode == 2 and (tmp_path / "results.json").read_text() == before


def test_the_same_command_resumes_in_the_same_directory(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *FAST, "trainer.max_steps=4"]
    env = {**os.environ}
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    line = next(x for x in first.stdout.splitlines() if x.startswith("run directory "))
    run_dir = line.removeprefix("run directory ").split(";")[0]
    assert run_dir.startswith(str(tmp_path / "outputs" / "debug-xs-quest")) and "trainer.max_steps=4" in run_dir
    longer = subprocess.run([*cmd[:-1], "trainer.max_steps=4", "resume=true"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert f"run directory {run_dir}; resumed from step 4" in longer.stdout  # resume=... is not part of the name
    named = subprocess.run([*cmd, "run_name=other"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert "resumed" not in named.stdout and "run_name=other" in named.stdout
