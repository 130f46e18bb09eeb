"""End-to-end: `python train.py` as a subprocess, with tiny step counts."""

import json
import math

import pytest
import torch
from conftest import DDP_TOLERANCE, FLOAT64, run_train

pytestmark = pytest.mark.slow

# float64: BLAS kernels differ between CPUs in the last bits, and fake quantization turns a
# last-bit difference near a rounding boundary into a different code, so an fp32 curve is
# machine-dependent (Intel vs AMD differed by 0.018 at step 9). In fp64 those differences
# are ~1e-16 relative and practically never reach a boundary.
GOLDEN_RUN = ("trainer.max_steps=30", "trainer.val_check_interval=15", "trainer.precision=64-true")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_train(run_dir, *GOLDEN_RUN)
    return run_dir, proc


def test_results_json_and_summary(default_run):
    run_dir, proc = default_run
    r = json.loads((run_dir / "results.json").read_text())
    assert r["status"] == "completed" and r["step"] == 30
    assert math.isfinite(r["val_loss"]) and r["val_loss"] < r["unigram_loss"]  # learned context
    assert r["val_loss"] > r["loss_floor"] > 0
    assert math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-4)
    assert r["tokens"] == 30 * 8 * 128 and r["precision"] == "w4a4" and r["quant_preset"] == "quest"
    assert r["w_bits"] == 4 and r["a_bits"] == 4 and r["non_embedding_params"] == 426_624
    for key in ("val loss", "perplexity" if False else "ppl", "loss floor", "tokens/s", "checkpoint"):
        assert key in proc.stdout
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.rglob(".*.tmp"))


def test_checkpoint_is_plain_and_complete(default_run):
    run_dir, _ = default_run
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step0000006.ckpt", "step0000012.ckpt", "step0000018.ckpt", "step0000024.ckpt", "step0000030.ckpt"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30
    assert ckpt["quantization"]["weight"]["bits"] == 4 and ckpt["quantization"]["weight"]["rotation"] == "hadamard"
    assert ckpt["config"]["model"]["size"] == "debug"
    assert "layers.0.attn.qkv" in ckpt["quantization"]["layers"]


def test_metrics_logged(default_run):
    run_dir, _ = default_run
    import csv

    rows = []
    for f in (run_dir / "logs").rglob("metrics.csv"):
        rows += list(csv.DictReader(f.open()))
    keys = {k for row in rows for k, v in row.items() if v != ""}
    for key in ("train/loss", "val/loss", "val/ppl", "lr", "perf/tokens_per_s", "quant/mean_masked_fraction", "quant/mean_rel_error"):
        assert key in keys, key
    assert "quant/layers.1.mlp.down.input_quantizer/masked_fraction" in keys
    errors = [float(r["quant/mean_rel_error"]) for r in rows if r.get("quant/mean_rel_error")]
    assert all(0.005 < e < 0.05 for e in errors)  # 4-bit Gaussian optimum is ~0.0115


def test_golden_loss_curve(default_run):
    """Silent numeric regressions (quantizer, model, data order, schedule) move this curve."""
    import csv

    from conftest import ROOT

    run_dir, _ = default_run
    golden = json.loads((ROOT / "tests" / "golden" / "debug_w4a4_30steps.json").read_text())
    rows = [r for f in (run_dir / "logs").rglob("metrics.csv") for r in csv.DictReader(f.open())]
    train = {r["step"]: float(r["train/loss"]) for r in rows if r.get("train/loss")}
    for step, loss in golden["train_loss"].items():
        assert abs(train[step] - loss) < golden["tolerance"], (step, train[step], loss)
    val = json.loads((run_dir / "results.json").read_text())["val_loss"]
    assert abs(val - golden["val_loss"]) < golden["tolerance"], (val, golden["val_loss"])


def test_resume_continues_from_saved_step(default_run, tmp_path):
    run_dir, _ = default_run
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    proc = run_train(copy, "trainer.max_steps=36", "trainer.val_check_interval=15", "trainer.precision=64-true")
    assert "resumed from step 30" in proc.stdout
    r = json.loads((copy / "results.json").read_text())
    assert r["step"] == 36 and r["status"] == "completed"
    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 36


def test_resume_restores_learnable_quantizer_state(tmp_path):
    run_train(tmp_path, "quant=lsq", "trainer.max_steps=6")
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    scales = {k: v for k, v in first.items() if k.endswith("quantizer.scale")}
    assert len(scales) == 20 and all(first[k.replace(".scale", ".scale_initialized")] for k in scales)
    proc = run_train(tmp_path, "quant=lsq", "trainer.max_steps=12")
    assert "resumed from step 6" in proc.stdout
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # the scales kept training from their saved values (not re-initialised from a new batch)
    moved = [abs(second[k] - v).item() for k, v in scales.items()]
    assert max(moved) < 0.2 * max(abs(v).item() for v in scales.values())


def test_ddp_cpu_matches_single_process(tmp_path):
    overrides = ("trainer.max_steps=8", "trainer.val_check_interval=8", "checkpoint.every_n_steps=8", FLOAT64)
    run_train(tmp_path / "single", *overrides)
    run_train(tmp_path / "ddp", "trainer=ddp_cpu", *overrides)
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert ddp["tokens"] == single["tokens"]
    assert abs(ddp["val_loss"] - single["val_loss"]) < DDP_TOLERANCE, (ddp["val_loss"], single["val_loss"])


def test_tensorboard_logger(tmp_path):
    run_train(tmp_path, "logger=tensorboard", "trainer.max_steps=4")
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_wandb_offline(tmp_path):
    run_train(tmp_path, "logger=wandb", "trainer.max_steps=4", env={"WANDB_MODE": "offline"})
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("quant=foo", "Could not find 'quant/foo'"),
        ("quant.bits=0", "bits=0 is not allowed"),
        ("data=local", "data.path"),
        ("data.seq_len=1", "data.seq_len=1 must be an integer >= 2"),
        ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
        ("data.source.num_documents=0", "num_documents"),
        ("optimizer.lr=0", "optimizer.lr=0 must be a number > 0"),
        ("scheduler.name=nope", "scheduler.name='nope' is not allowed"),
        ("scheduler.warmup_fraction=1.5", "scheduler.warmup_fraction=1.5 is not allowed"),
        ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps=0 must be an integer >= 1"),
        ("checkpoint.foo=1", "Could not override 'checkpoint.foo'"),
        ("tokens_per_param=0", "tokens_per_param=0 must be a positive number or null"),
        ("max_tokens=-100", "max_tokens=-100 must be a positive number or null"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 must be a number >= 0"),
        ("trainer.max_steps=x", "trainer.max_steps='x' must be an integer >= 1"),
        ("+foo=1", "unknown config key 'foo'"),
        ("quant.weight.hadamard_block=256", "not divisible by the Hadamard block 256"),
        ("telemetry.every=-5", "telemetry.every=-5 must be an integer >= 0"),
        *([("trainer=gpu", "no CUDA device is visible; add trainer=cpu")] if not torch.cuda.is_available() else []),
    ],
)
def test_bad_overrides_fail_in_one_line_before_training(tmp_path, override, message):
    proc = run_train(tmp_path, override, check=False, timeout=120)
    _assert_one_line_error(proc, message)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results.json").exists()


def _assert_one_line_error(proc, message: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_files_fail_in_one_line_naming_them(tmp_path):
    data = tmp_path / "bad.txt"
    data.write_bytes(b"a fine line\n\xff\xfe not utf-8\n")
    _assert_one_line_error(run_train(tmp_path / "a", "data=local", f"data.path={data}", check=False), "is not UTF-8: byte 0xff at offset 12")
    tok = tmp_path / "tok.json"
    tok.write_text('{"broken": ')
    _assert_one_line_error(run_train(tmp_path / "b", "tokenizer=hf", f"tokenizer.path={tok}", check=False), f"tokenizer.path='{tok}' is not a tokenizers JSON file")


def test_generate_and_evaluate_scripts(default_run, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    run_dir, _ = default_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    gen = subprocess.run(
        [sys.executable, "scripts/generate.py", "--ckpt", str(ckpt), "--prompt", "farm:", "--tokens", "40", "--temperature", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    assert "--- sample 0 (step 30) ---" in gen.stdout and len(gen.stdout.split("---")[-1]) > 20
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"ctx": "farm: the", "endings": ["cow sleeps.", "zq xj"], "label": 0}\n')
    out = tmp_path / "eval.json"
    subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--ckpt", str(ckpt), "--hellaswag", str(mc), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    metrics = json.loads(out.read_text())
    r = json.loads((run_dir / "results.json").read_text())
    assert abs(metrics["val"]["loss"] - r["val_loss"]) < 1e-4  # same quantized forward, same val set
    assert metrics["multiple_choice"]["n"] == 1

    # The README's path: train -> export -> generate from the packed model: the same greedy text.
    export = tmp_path / "export"
    subprocess.run([sys.executable, "scripts/export.py", "--ckpt", str(ckpt), "--out", str(export)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    packed = subprocess.run(
        [sys.executable, "scripts/generate.py", "--model", str(export), "--prompt", "farm:", "--tokens", "40", "--temperature", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )

    def text(out: str) -> str:
        return out.split("---")[-1].split("\n[")[0]

    assert text(packed.stdout) == text(gen.stdout) and "tokens/s, packed model" in packed.stdout
    packed_eval = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--model", str(export)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    assert abs(json.loads(packed_eval.stdout)["val"]["loss"] - metrics["val"]["loss"]) < 1e-4
