import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Offline everywhere: hub and wandb clients read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One token cache for the whole session (subprocess runs inherit it): the corpus is built once.
os.environ.setdefault("QAT_CACHE_DIR", tempfile.mkdtemp(prefix="qat-test-cache-"))

# Without a GPU the Triton kernels run in the interpreter. Set before any test module is
# imported: lightning imports triton, and triton fixes its mode from the environment then.
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: on a shared 2-core machine more
    threads only add contention (several times slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is absent")
    return SHARED


# Runs compared across process layouts (DDP, FSDP, srun) train in float64. In float32 a
# different reduction order flips a few 4-bit codes, and the trajectories drift apart by an
# amount that depends on the CPU (2.2e-3 in val loss after 16 steps on one AMD machine). In
# float64 the two layouts give the same val loss to every reported digit.
FLOAT64 = "trainer.precision=64-true"
DDP_TOLERANCE = 1e-5  # val loss and val KL, float64 runs

# Tiny, fast settings for end-to-end runs on 2 CPU cores.
TINY = [
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.enable_progress_bar=false",
    "data.batch_size=8",
    "data.val_batches=2",
    "checkpoint.every_n_steps=6",
    "telemetry.every=5",
]


def run_train(run_dir: Path, *overrides: str, check: bool = True, env: dict | None = None, timeout: int = 600):
    """python train.py as a user runs it; returns the CompletedProcess."""
    import subprocess

    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def refused(capsys, main, *args: str) -> str:
    """A script's main(args) refused the input: exit code 2 and exactly one `error:` line; returns it."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
