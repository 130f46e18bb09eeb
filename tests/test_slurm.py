"""The multi-node path on SLURM itself: a one-node cluster (`scripts/slurm_local.sh up`).

- a 2-run sweep through hydra/launcher=slurm_cpu gives the local runs' results;
- a job requeued mid-run (`scontrol requeue`) and a job sent the warning signal
  (`scancel --signal=USR1`: Lightning saves hpc_ckpt_1.ckpt and requeues itself) both
  resume from their newest checkpoint and end with the uninterrupted run's weights, exactly;
- `srun` with two tasks trains DDP on CPU, matching one process in float64.

Skipped when sbatch is absent, unless QAT_REQUIRE_SLURM=1 (.ci/run), which makes that a failure.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import DDP_TOLERANCE, FLOAT64, ROOT, TINY, run_train

if shutil.which("sbatch") is None:
    if os.environ.get("QAT_REQUIRE_SLURM") == "1":
        raise RuntimeError("QAT_REQUIRE_SLURM=1 but sbatch is absent; run scripts/slurm_local.sh up")
    pytest.skip("sbatch is absent (scripts/slurm_local.sh up starts a local cluster)", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# Jobs inherit this environment (sbatch --export=ALL), QAT_CACHE_DIR included: one token cache.
RUN = (
    "model=debug-xs",
    "telemetry.every=0",
    "trainer.max_steps=16",
    "trainer.val_check_interval=8",
    "checkpoint.every_n_steps=1",
    "checkpoint.keep_all=false",
)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _job(job_id):
    """`scontrol show job` as {field: value}."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(token.split("=", 1) for token in out.split() if "=" in token)


def _wait(job_id, until, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job(job_id)
        if until(info):
            return info
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s: {info.get('Reason')}")


@pytest.fixture
def sbatch(tmp_path):
    """Submits `python train.py` as a requeueable batch job in tmp_path/run; cancels what is left."""
    jobs = []

    def submit(*overrides):
        run_dir = tmp_path / "run"
        # exec: python is the batch step's own process, so `scancel --batch` signals it directly
        command = "exec " + shlex.join([sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *overrides])
        out = subprocess.run(
            # --ntasks: SLURM_NTASKS is what makes Lightning use its SLURM environment (auto-requeue)
            ["sbatch", "--parsable", "--requeue", "--ntasks=1", "--cpus-per-task=1", "--time=10", "--job-name=qat-test",
             f"--chdir={ROOT}", f"--output={tmp_path / 'slurm-%j.out'}", "--open-mode=append", "--wrap", command],
            capture_output=True, text=True, check=True,
        )
        jobs.append(out.stdout.strip().split(";")[0])
        return jobs[-1], run_dir, tmp_path / f"slurm-{jobs[-1]}.out"

    yield submit
    for job_id in jobs:
        subprocess.run(["scancel", job_id], capture_output=True)


def _wait_for_step(job_id, run_dir, step):
    def reached(info):
        assert info["JobState"] not in ENDED, f"job {job_id} ended ({info['JobState']}) before step {step}"
        try:
            return _results(run_dir).get("step", 0) >= step
        except (OSError, ValueError):
            return False

    _wait(job_id, reached)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The local run every SLURM run below must reproduce."""
    run_dir = tmp_path_factory.mktemp("local")
    run_train(run_dir, *RUN)
    return run_dir


def test_sweep_through_the_slurm_launcher_matches_local_runs(uninterrupted, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "train.py", "-m", *TINY, *RUN, "quant.bits=2,4", f"hydra.sweep.dir={sweep}",
        "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=60",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {int(re.search(r"quant\.bits=(\d+)", d.name).group(1)): d for d in sweep.iterdir() if (d / "results.json").is_file()}
    assert sorted(runs) == [2, 4]
    submission = next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR1@60" in submission and "#SBATCH --ntasks-per-node=1" in submission
    assert "gpus" not in submission
    local = {4: uninterrupted, 2: tmp_path / "local2"}
    run_train(local[2], *RUN, "quant.bits=2")
    for bits, run_dir in runs.items():
        slurm, here = _results(run_dir), _results(local[bits])
        assert slurm["status"] == "completed" and slurm["w_bits"] == bits and slurm["step"] == 16
        assert slurm["val_loss"] == here["val_loss"], (bits, slurm["val_loss"], here["val_loss"])


def test_requeued_job_resumes_to_the_uninterrupted_weights(uninterrupted, sbatch):
    job_id, run_dir, log = sbatch(*RUN)
    _wait_for_step(job_id, run_dir, 3)
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # SIGTERM now, the job runs again later
    info = _wait(job_id, lambda i: i["JobState"] in ENDED)
    output = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, output[-3000:])
    cut = int(re.search(r"SIGTERM received: saved a checkpoint at step (\d+)", output).group(1))
    assert 3 <= cut < 16 and f"resumed from step {cut}" in output
    assert _results(run_dir)["resumed_from_step"] == cut
    whole, again = _weights(uninterrupted), _weights(run_dir)
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


def test_warning_signal_checkpoints_requeues_and_resumes_to_the_same_weights(uninterrupted, sbatch):
    job_id, run_dir, log = sbatch(*RUN)
    _wait_for_step(job_id, run_dir, 3)
    # What SLURM sends ahead of the time limit (--signal=USR1@N): to python, the batch step itself.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    info = _wait(job_id, lambda i: i["JobState"] in ENDED)
    output = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, output[-3000:])
    # Lightning's handler saved hpc_ckpt_1.ckpt and requeued; the requeue's SIGTERM saved last.ckpt
    warned = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"]
    cut = int(re.search(r"SIGTERM received: saved a checkpoint at step (\d+)", output).group(1))
    assert 3 <= warned <= cut < 16 and f"resumed from step {cut}" in output
    whole, again = _weights(uninterrupted), _weights(run_dir)
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


def test_srun_two_tasks_ddp_matches_one_process(tmp_path):
    # Both in float64 (conftest.FLOAT64); the requeue tests above stay in float32, where a
    # resume is bitwise (Lightning restores a 64-true run's state through float32).
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    run_train(single_dir, *RUN, FLOAT64)
    cmd = [
        "srun", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", "--job-name=qat-test-ddp",
        sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={ddp_dir}", *RUN, FLOAT64, "trainer=ddp_cpu",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr  # the ranks came from SLURM
    ddp, single = _results(ddp_dir), _results(single_dir)
    assert ddp["status"] == "completed" and ddp["tokens"] == single["tokens"]
    assert abs(ddp["val_loss"] - single["val_loss"]) < DDP_TOLERANCE, (ddp["val_loss"], single["val_loss"])
