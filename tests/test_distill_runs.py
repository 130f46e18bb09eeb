"""distill=kd end to end, as a user runs train.py: on a tiny save_pretrained Llama (built here,
nothing downloaded), the teacher's metrics in results.json, no teacher weights in the checkpoint,
a resumed run equal to an uninterrupted one, another teacher refused, DDP and FSDP on CPU ranks
equal to one process, and a from-scratch run refused before any work."""

import json
import shutil

import pytest
import torch
from conftest import DDP_TOLERANCE, FLOAT64, run_train
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

from test_hf import save_hf_llama  # noqa: E402

RUN = (
    "distill=kd", "quant.weight.hadamard_block=16", "data.seq_len=64", "trainer.max_steps=4",
    "trainer.val_check_interval=2", "checkpoint.every_n_steps=2", "telemetry.every=2", "trainer.log_every_n_steps=1",
)  # fmt: skip


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher")
    save_hf_llama(directory, "gqa_sharded")
    return directory


def _run(run_dir, teacher_dir, *extra, check=True):
    return run_train(run_dir, "model=hf", f"model.path={teacher_dir}", *RUN, *extra, check=check)


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _ckpt(run_dir, name="last.ckpt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher_dir):
    run_dir = tmp_path_factory.mktemp("distilled")
    proc = _run(run_dir, teacher_dir)
    return run_dir, proc


def test_a_distilled_run_reports_the_teacher_metrics_and_saves_no_teacher(distilled, teacher_dir):
    run_dir, proc = distilled
    r = _results(run_dir)
    assert r["status"] == "completed" and r["step"] == 4
    assert r["val_kl"] >= 0 and 0 <= r["val_top1_agree"] <= 1
    assert r["distill_teacher"]["path"] == str(teacher_dir) and len(r["distill_teacher"]["sha256"]) == 64
    assert "distillation from" in proc.stdout and "val KL to the teacher" in proc.stdout
    ckpt = _ckpt(run_dir)
    assert ckpt["distill_teacher"] == r["distill_teacher"]
    assert not any("teacher" in k for k in ckpt["state_dict"])  # its identity only, never its weights
    assert ckpt["config"]["distill"]["name"] == "kd"
    logged = next((run_dir / "logs").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/kd", "train/ce", "val/kl", "val/top1_agree"} <= set(logged)


def test_a_resumed_distilled_run_equals_the_uninterrupted_one(distilled, teacher_dir, tmp_path):
    run_dir, _ = distilled
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    for name in ("last.ckpt", "step0000004.ckpt"):
        (cut / "checkpoints" / name).unlink(missing_ok=True)
    proc = _run(cut, teacher_dir)
    assert "resumed from step 2" in proc.stdout
    whole, again = _ckpt(run_dir)["state_dict"], _ckpt(cut)["state_dict"]
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


def test_resuming_with_another_teacher_is_refused_naming_both(distilled, teacher_dir, tmp_path):
    run_dir, _ = distilled
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    shard = sorted(other.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, shard, metadata={"format": "pt"})
    before = (run_dir / "results.json").read_text()
    proc = _run(run_dir, teacher_dir, f"distill.teacher={other}", "trainer.max_steps=6", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(teacher_dir) in line and str(other) in line
    assert "Traceback" not in proc.stderr and (run_dir / "results.json").read_text() == before


def test_distillation_without_a_teacher_is_refused_before_any_work(tmp_path):
    proc = run_train(tmp_path, "model=debug-xs", "distill=kd", check=False)
    assert proc.returncode == 2 and "trained from scratch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_ddp_distillation_matches_one_process(teacher_dir, tmp_path):
    _run(tmp_path / "one", teacher_dir, FLOAT64)
    _run(tmp_path / "two", teacher_dir, FLOAT64, "trainer=ddp_cpu")
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert two["tokens"] == one["tokens"]
    assert abs(two["val_loss"] - one["val_loss"]) < DDP_TOLERANCE, (two["val_loss"], one["val_loss"])
    assert abs(two["val_kl"] - one["val_kl"]) < DDP_TOLERANCE, (two["val_kl"], one["val_kl"])


def test_fsdp_distillation_matches_ddp(teacher_dir, tmp_path):
    # Lightning's FSDP refuses float64; on the same two ranks it must agree with DDP almost
    # bitwise in float32 (each rank holds the whole teacher, so the targets are the same).
    _run(tmp_path / "ddp", teacher_dir, "trainer=ddp_cpu")
    _run(tmp_path / "fsdp", teacher_dir, "trainer=fsdp_cpu")
    ddp, fsdp = _results(tmp_path / "ddp"), _results(tmp_path / "fsdp")
    assert fsdp["tokens"] == ddp["tokens"]
    assert abs(fsdp["val_loss"] - ddp["val_loss"]) < 1e-4, (fsdp["val_loss"], ddp["val_loss"])
    assert abs(fsdp["val_kl"] - ddp["val_kl"]) < 1e-4, (fsdp["val_kl"], ddp["val_kl"])


def test_evaluate_against_the_teacher_reproduces_the_runs_val_kl(distilled, teacher_dir, tmp_path, capsys):
    """scripts/evaluate.py --reference on the run's own val tokens gives the KL and top-1 agreement
    that training logged (one computed by the LightningModule, one by AgreementMeter); a model
    against itself scores KL 0 and 100% same top-1."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    import evaluate

    run_dir, _ = distilled
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    assert evaluate.main(["--ckpt", ckpt, "--reference", str(teacher_dir), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    r = _results(run_dir)
    assert m["reference"]["kl_mean"] == pytest.approx(r["val_kl"], rel=1e-4)
    assert m["reference"]["same_top1"] == pytest.approx(100 * r["val_top1_agree"], rel=1e-4)
    assert m["val"]["loss"] == pytest.approx(r["val_loss"], rel=1e-5)
    assert m["reference"]["kl_p99"] >= m["reference"]["kl_mean"] > 0 and m["reference"]["rms_dp"] > 0
    assert evaluate.main(["--ckpt", ckpt, "--reference", ckpt, "--out", str(tmp_path / "self.json")]) == 0
    itself = json.loads((tmp_path / "self.json").read_text())["reference"]
    assert itself["kl_mean"] == 0.0 and itself["same_top1"] == 100.0 and itself["ppl"] == itself["reference_ppl"]
    capsys.readouterr()
    assert evaluate.main(["--ckpt", ckpt, "--reference", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: --reference=")


def test_the_recipe_command_needs_no_other_flag(teacher_dir, tmp_path):
    """experiment=qat_finetune + quant=gguf_q4_0 + distill=kd, as the README gives it (trainer=cpu
    here: the experiment targets a GPU): absmax groups of 32 and a teacher, with no other flag."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the farm {i} grows corn and wheat in the sun" for i in range(4000)) + "\n")
    run = tmp_path / "run"
    proc = run_train(
        run, "experiment=qat_finetune", f"model.path={teacher_dir}", f"data.path={corpus}", "quant=gguf_q4_0", "distill=kd",
        "trainer=cpu", "trainer.max_steps=2", "data.seq_len=64", "data.batch_size=4", "trainer.accumulate_grad_batches=1",
    )  # fmt: skip
    assert "4-bit none absmax int_zero trust g32" in proc.stdout and "distillation from" in proc.stdout
    assert _results(run)["status"] == "completed" and _results(run)["val_kl"] > 0


def test_distillation_with_compile_and_gradient_accumulation(teacher_dir, tmp_path):
    """The compiled student (inductor) learns from the eager teacher over accumulated micro-batches."""
    proc = _run(tmp_path, teacher_dir, "compile=true", "trainer.accumulate_grad_batches=2", "trainer.max_steps=2")
    r = _results(tmp_path)
    assert r["status"] == "completed" and r["step"] == 2 and r["val_kl"] > 0 and "distillation from" in proc.stdout
