"""scripts/ptq.py end to end, as a user runs it: RTN and GPTQ checkpoints from a Hugging Face
directory and from a checkpoint, read by evaluate.py and export.py, and QAT started from one
(`init_from=`), recorded in results.json; bad input is one line."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

ROTATED = ["quant.bits=4", "quant.weight.hadamard_block=full", "quant.activation.hadamard_block=full"]
DATA = ["data=synthetic", "data.seq_len=32", "data.batch_size=4", "data.val_batches=2", "data.source.num_documents=200", "data.source.num_val_documents=20"]


def run(script: str, *args: str, cwd, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from test_hf import save_hf_llama

    directory = tmp_path_factory.mktemp("hf")
    save_hf_llama(directory, "gqa_sharded")
    return directory


def val_loss(ckpt_or_model: list[str], cwd) -> float:
    return json.loads(run("scripts/evaluate.py", *ckpt_or_model, cwd=cwd).stdout)["val"]["loss"]


def test_rtn_gptq_evaluate_export_and_qat_from_gptq(hf_dir, tmp_path):
    rtn = run("scripts/ptq.py", "--model", str(hf_dir), "--method", "rtn", "--out", "rtn.ckpt", *ROTATED, *DATA, cwd=tmp_path)
    gptq = run("scripts/ptq.py", "--model", str(hf_dir), "--method", "gptq", "--calibration-batches", "3", "--out", "gptq.ckpt", *ROTATED, *DATA, cwd=tmp_path)
    assert "GPTQ block 1:" in gptq.stdout and "mean relative output error" in gptq.stdout
    assert json.loads(rtn.stdout.strip().splitlines()[-1])["method"] == "rtn"

    import torch

    saved = torch.load(tmp_path / "gptq.ckpt", weights_only=True)
    assert saved["ptq"]["method"] == "gptq" and saved["ptq"]["calibration_tokens"] == 3 * 4 * 32
    # GPTQ keeps its codes by default: the scale it rounded with is stored; RTN refits as configured.
    assert "GPTQ stores the scale it rounds with" in gptq.stdout and "GPTQ stores" not in rtn.stdout
    assert saved["config"]["quant"]["weight"]["scale_update"] == "frozen"
    assert all(r["code_agreement"] == 1.0 for r in saved["ptq"]["layers"].values())
    layers = saved["ptq"]["layers"]
    assert len(layers) == 2 * 5 and all(r["output_error_gptq"] < r["output_error_rtn"] for r in layers.values())

    losses = {name: val_loss(["--ckpt", f"{name}.ckpt"], tmp_path) for name in ("rtn", "gptq")}
    assert all(0 < loss < 10 for loss in losses.values())
    run("scripts/export.py", "--ckpt", "gptq.ckpt", "--out", "packed", cwd=tmp_path)
    # fp32 fake-quant vs the integer forward: a few activation codes flip (0.025% of the loss measured)
    assert abs(val_loss(["--model", "packed"], tmp_path) - losses["gptq"]) < 2e-3 * losses["gptq"]

    # QAT from the GPTQ checkpoint: the run starts from its weights and says so.
    run_dir = tmp_path / "qat"
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}", "model=hf", f"model.path={hf_dir}",
           *ROTATED, *DATA, f"init_from={tmp_path / 'gptq.ckpt'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"initial weights from {tmp_path / 'gptq.ckpt'} (step 0, gptq)" in proc.stdout
    result = json.loads((run_dir / "results.json").read_text())
    assert result["init_from"]["ptq"] == "gptq" and result["status"] == "completed"

    # From a checkpoint: its model and data are kept, the activation width changes (W4A16).
    run("scripts/ptq.py", "--ckpt", "gptq.ckpt", "--method", "gptq", "--calibration-batches", "2", "--out", "w4a16.ckpt", "quant.activation.bits=16", cwd=tmp_path)
    saved = torch.load(tmp_path / "w4a16.ckpt", weights_only=True)
    assert saved["config"]["quant"]["activation"]["bits"] == 16 and saved["config"]["model"]["path"] == str(hf_dir)


def test_gptq_keeps_every_code_unless_told_to_refit(hf_dir, tmp_path):
    """By default (and with scale_update=learned) GPTQ rounds with the stored scale and keeps it,
    so the forward reproduces every code it chose; scale_update=refit on the command line refits
    the scale in every forward, and a few per cent of the codes differ."""
    import torch

    # Overrides on both sides of the options, as a user may write them.
    proc = run("scripts/ptq.py", "--model", str(hf_dir), "--method", "gptq", *ROTATED, "--calibration-batches", "2", "--out", "kept.ckpt",
               *DATA, "quant.weight.scale_update=learned", cwd=tmp_path)  # fmt: skip
    assert "codes the forward reproduces: >= 100.00% per layer" in proc.stdout and "GPTQ stores" not in proc.stdout
    saved = torch.load(tmp_path / "kept.ckpt", weights_only=True)
    assert all(r["code_agreement"] == 1.0 for r in saved["ptq"]["layers"].values())
    assert sum(k.endswith("weight_quantizer.scale") for k in saved["state_dict"]) == 2 * 5
    run("scripts/ptq.py", "--model", str(hf_dir), "--method", "gptq", "--calibration-batches", "2", "--out", "refit.ckpt",
        *ROTATED, *DATA, "quant.weight.scale_update=refit", cwd=tmp_path)  # fmt: skip
    saved = torch.load(tmp_path / "refit.ckpt", weights_only=True)
    assert saved["config"]["quant"]["weight"]["scale_update"] == "refit"
    assert min(r["code_agreement"] for r in saved["ptq"]["layers"].values()) < 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "awq"], "--method='awq' is not a method; use one of rtn, gptq"),
        (["--method", "gptq", "--calibration-batches", "0"], "--calibration-batches=0"),
        (["--method", "rtn", "quant.bits=5.5", "data.seq_len=32"], "quant.weight"),
        (["--method", "gptq", "quant=gguf_q4_1", "data.seq_len=32"], "GPTQ does not support quant.weight asymmetric=true"),
    ],
)
def test_bad_input_is_one_line(hf_dir, tmp_path, args, message):
    proc = run("scripts/ptq.py", "--model", str(hf_dir), "--out", "x.ckpt", *args, cwd=tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "x.ckpt").exists()
