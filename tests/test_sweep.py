"""Hydra multirun sweeps: run directories from overrides, completed runs skipped."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def _multirun(sweep_dir, *overrides):
    cmd = [sys.executable, "train.py", "-m", *TINY, "trainer.max_steps=4", "model=debug-xs", f"hydra.sweep.dir={sweep_dir}", "skip_completed=true", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)


def _run_dirs(sweep_dir):
    """{bits: run dir}; each dir name is derived from the job's overrides."""
    dirs = {}
    for results in sweep_dir.glob("*/results.json"):
        bits = next(p.split("=")[1] for p in results.parent.name.split(",") if p.startswith("quant.bits="))
        dirs[int(bits)] = results.parent
    return dirs


def test_sweep_trains_only_missing_runs(tmp_path):
    _multirun(tmp_path, "quant.bits=2,4,16")
    dirs = _run_dirs(tmp_path)
    assert sorted(dirs) == [2, 4, 16]
    for bits, d in dirs.items():
        r = json.loads((d / "results.json").read_text())
        assert r["status"] == "completed" and r["w_bits"] == bits and r["step"] == 4
    assert json.loads((dirs[16] / "results.json").read_text())["precision"] == "bf16"
    # a finished run stays untouched, a failed one is trained again
    marker = {"status": "completed", "marker": True}
    (dirs[16] / "results.json").write_text(json.dumps(marker))
    (dirs[4] / "results.json").write_text(json.dumps({"status": "failed"}))
    again = _multirun(tmp_path, "quant.bits=2,4,16")
    assert again.stdout.count("skipping") == 2
    assert json.loads((dirs[16] / "results.json").read_text()) == marker
    assert json.loads((dirs[4] / "results.json").read_text())["status"] == "completed"
