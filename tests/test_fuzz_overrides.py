"""Fuzzed command lines: every combination of overrides either trains (two steps, a valid
results.json) or exits with code 2 and one `error:` line. A traceback is a failure."""

import json
import math

import pytest
from conftest import run_train
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

# Each key with values a user might type: valid ones and mistakes.
CHOICES = {
    "quant": ["quest", "bf16", "ste", "lsq", "pact", "quest_fp4", "quest_2of4", "weight_only", "nope"],
    "quant.bits": ["1", "1.58", "2", "3", "8", "16", "0", "5.5", "x"],
    "quant.weight.grid": ["int", "int_zero", "gaussian", "fp4", "nf4"],
    "quant.weight.granularity": ["row", "32", "3", "0"],
    "quant.weight.hadamard_block": ["32", "128", "256", "full", "3"],
    "quant.weight.estimator": ["trust", "ste", "clip", "magic"],
    "model": ["debug-xs", "debug", "7b"],
    "optimizer.lr": ["1e-3", "0", "-1", "x", "null"],
    "scheduler": ["cosine", "wsd", "nope"],
    "scheduler.warmup_fraction": ["0", "0.5", "1.5"],
    "data.batch_size": ["4", "6", "0", "x"],
    "data.seq_len": ["32", "64", "1"],
    "checkpoint.every_n_steps": ["1", "0", "-1"],
    "trainer.gradient_clip_val": ["1.0", "0", "-1", "null"],
    "max_tokens": ["null", "-100", "2048"],  # a budget replaces trainer.max_steps: keep it small
    "+foo": ["1"],
    "seed": ["0", "-3", "x"],
}

overrides = st.dictionaries(st.sampled_from(sorted(CHOICES)), st.none(), min_size=1, max_size=3).flatmap(
    lambda keys: st.tuples(*[st.sampled_from(CHOICES[k]).map(lambda v, k=k: f"{k}={v}") for k in sorted(keys)])
)


# No shrinking: each example is a training run, and a failure prints its overrides anyway.
@settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=overrides)
def test_any_override_trains_or_fails_in_one_line(tmp_path_factory, drawn):
    run_dir = tmp_path_factory.mktemp("fuzz")
    proc = run_train(run_dir, "model=debug-xs", "telemetry.every=0", "trainer.max_steps=2", *drawn, check=False, timeout=300)
    assert "Traceback" not in proc.stderr, (drawn, proc.stderr[-3000:])
    if proc.returncode == 0:
        r = json.loads((run_dir / "results.json").read_text())
        assert r["status"] == "completed" and r["step"] == r["max_steps"] and math.isfinite(r["val_loss"]), drawn
        return
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], (drawn, proc.stderr[-2000:])
    assert not (run_dir / "checkpoints").exists(), drawn
