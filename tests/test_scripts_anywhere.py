"""Every script that takes a checkpoint or a model, run as a user runs it from another
directory (a script's sys.path[0] is scripts/, not the checkout): with Hugging Face's `kernels`
installed (transformers >= 5.25) a top-level `kernels` import found that package instead of
ours, and export/evaluate/... stopped with an AttributeError."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("anywhere") / "run"
    proc = run_train(run_dir, "model=debug-xs", "quant.bits=4", "trainer.max_steps=4", "trainer.val_check_interval=4", "checkpoint.every_n_steps=4")
    assert "max_steps 4 from trainer.max_steps=4 (command line)" in proc.stdout
    return run_dir / "checkpoints" / "last.ckpt"


def script(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_checkpoint_and_model_scripts_run_from_another_directory(quantized_run, tmp_path):
    ckpt = str(quantized_run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script("export.py", "--ckpt", ckpt, "--out", "packed", cwd=elsewhere)
    assert (elsewhere / "packed" / "model.safetensors").is_file()
    by_ckpt = script("generate.py", "--ckpt", ckpt, "--prompt", "farm:", "--tokens", "12", "--temperature", "0", cwd=elsewhere)
    by_model = script("generate.py", "--model", "packed", "--prompt", "farm:", "--tokens", "12", "--temperature", "0", cwd=elsewhere)
    assert by_ckpt.stdout.split("\n[")[0].split("---\n")[-1] == by_model.stdout.split("\n[")[0].split("---\n")[-1]
    assert by_ckpt.stdout.split("---\n")[-1].startswith("farm:")  # the prompt, then its continuation
    losses = [json.loads(script("evaluate.py", flag, path, cwd=elsewhere).stdout)["val"]["loss"] for flag, path in (("--ckpt", ckpt), ("--model", "packed"))]
    assert abs(losses[0] - losses[1]) < 1e-4
    script("export_hf.py", "--ckpt", ckpt, "--out", "hf", "--weights", "quantized", cwd=elsewhere)
    assert (elsewhere / "hf" / "config.json").is_file()
    script("layer_sensitivity.py", "--ckpt", ckpt, "--out", "sens.csv", "--bits", "2", "--by", "type", "--batches", "1", cwd=elsewhere)
    assert (elsewhere / "sens.csv").read_text().count("\n") > 1
    script("grad_alignment.py", "--ckpt", ckpt, "--batches", "1", "--out", "align.json", cwd=elsewhere)
    assert json.loads((elsewhere / "align.json").read_text())
    script("bench_scale_fit.py", "--model", "debug-xs", "--rounds", "1", "--out", "fits", cwd=elsewhere)
    assert json.loads((elsewhere / "fits" / "bench_scale_fit.json").read_text())["rows"]


def test_a_wheel_install_keeps_hugging_faces_kernels(tmp_path):
    """`pip install .` (not editable) into a fresh venv that already has transformers: our
    kernels/ and models/ land inside qat/, Hugging Face's `kernels` stays itself, pip check
    is clean, and a Quantizer builds next to an imported transformers."""
    pytest.importorskip("transformers")
    import sysconfig
    from pathlib import Path

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]  # this pip, working on that venv
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies are this environment's (a path line, so its editable-install hooks stay
    # out); the wheel built from the checkout is what is tested.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([*pip, "install", "--quiet", "--no-deps", str(ROOT)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    assert {"aot.py", "support.py"} <= {p.name for p in (site / "qat" / "kernels").glob("*.py")}
    assert (site / "qat" / "models" / "llama.py").is_file() and not (site / "kernels" / "aot.py").exists()
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    code = (
        "import transformers, torch, kernels, qat\n"
        "from transformers import LlamaConfig\n"
        "from qat import Quantizer, QuantizerConfig, Llama, llama_config\n"
        "assert qat.__file__.startswith(%r), qat.__file__\n"
        "assert not kernels.__file__.startswith(%r), kernels.__file__\n"
        "Quantizer(QuantizerConfig(bits=4))(torch.randn(2, 128)); Llama(llama_config('debug-xs', vocab_size=40))\n"
        "print('ok')\n"
    ) % (str(site), str(site))
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
