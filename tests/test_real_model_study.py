"""scripts/real_model_study.py: every arm's command composes into the precision its name says
(the 16-bit fine-tune arm once trained W4A4), and bad input is one line."""

import argparse
import importlib.util

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, refused

spec = importlib.util.spec_from_file_location("real_model_study", ROOT / "scripts" / "real_model_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

ARGS = argparse.Namespace(model="m", data="d.jsonl", seq_len=256, batch_size=4, val_batches=8, val_fraction=0.02,
                          calibration_batches=16, steps=20, lr=1e-4, seed=0)  # fmt: skip


@pytest.mark.parametrize("arm", study.ARMS, ids=lambda a: a.name)
def test_each_arm_composes_to_its_named_precision(arm, tmp_path):
    (cmd,), _ = study.arm_commands(arm, ARGS, tmp_path)
    overrides = [c for c in cmd[2:] if "=" in c and not c.startswith(("hydra.", "--"))]
    if arm.method != "qat":
        overrides = ["model=hf", *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[o for o in overrides if not o.startswith(("init_from", "model.path"))] + ["model.path=m"])
    w, a = cfg.quant.weight, cfg.quant.activation
    name = arm.name
    if name in ("16-bit", "finetune-16-bit"):
        assert (w.bits, a.bits) == (16, 16)
    elif "-gguf-" in name:  # llama.cpp's types: weight-only, no rotation, blocks of 32
        kind = name.split("-gguf-")[1].removesuffix("-mse")
        assert (w.bits, a.bits, w.rotation, w.granularity, w.scale_dtype) == (4, 16, "none", 32, "float16")
        assert (w.grid, w.asymmetric) == {"q4_0": ("int_zero", False), "q4_1": ("int", True)}[kind]
        assert w.scale == ("rms_mse" if name.endswith("-mse") else "absmax")  # absmax: the presets' default
    else:
        wa = next(p for p in name.split("-") if p.startswith("w"))
        assert f"w{w.bits}a{a.bits}" == wa, (name, w.bits, a.bits)
        assert w.rotation == ("none" if "-none" in name else "hadamard")
        assert w.hadamard_block == (64 if "-h64" in name else 128 if "-none" in name else "full")
        assert w.estimator == ("ste" if "-ste-" in name else "trust")


def test_bad_input_is_one_line(capsys, tmp_path):
    assert "--arms 'nope' is not an arm" in refused(capsys, study.main, "--model", "m", "--data", "d", "--out", str(tmp_path), "--arms", "nope")
    assert "--steps=0 must be >= 1" in refused(capsys, study.main, "--model", "m", "--data", "d", "--out", str(tmp_path), "--steps", "0")
    assert "must be a save_pretrained directory" in refused(capsys, study.main, "--model", "m", "--data", "d", "--out", str(tmp_path))
