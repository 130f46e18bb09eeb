"""scripts/grad_alignment.py and the study script on a real (tiny) training run."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_train

pytestmark = pytest.mark.slow


def test_alignment_logged_recorded_and_computed_for_a_checkpoint(tmp_path):
    run_train(tmp_path / "run", "model=debug-xs", "trainer.max_steps=6", "telemetry.grad_alignment_every=3", "telemetry.final_grad_alignment=true")
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 < r["grad_alignment"]["align/mean_cos"] <= 1.0
    logged = (next((tmp_path / "run" / "logs").rglob("metrics.csv"))).read_text()
    assert "align/mean_cos" in logged and "align/layers.0.mlp.down/cos" in logged
    out = tmp_path / "align.json"
    proc = subprocess.run([sys.executable, "scripts/grad_alignment.py", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--batches", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    assert "mean over 5 layers" in proc.stdout and json.loads(out.read_text())["means"]["align/mean_cos"] > 0
    study = subprocess.run([sys.executable, "scripts/estimator_study.py", str(tmp_path), "--out", str(tmp_path / "study")], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    assert "| 4 | trust | hadamard | 1 |" in study.stdout and (tmp_path / "study" / "loss_vs_bits.png").stat().st_size > 0
