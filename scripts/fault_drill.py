"""Kill -9 drill: a run killed at several moments, each time re-run with the same command,
must end with the same final weights as an uninterrupted run.

    python scripts/fault_drill.py --kills 5 --steps 60 --out drill.json [train.py overrides ...]

Moments: --kills kills, alternating between "during a checkpoint write" (the instant a temp
file of an atomic write appears) and "mid-step" (a random time after a checkpoint). After
each kill the same command is started again (it resumes). Prints and writes, per kill, the
step it resumed from, and whether the final weights equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]


def _command(run_dir: Path, steps: int, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
            "checkpoint.every_n_steps=5", "checkpoint.keep_all=false", f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip


def _temp_file_present(run_dir: Path) -> bool:
    return any(p.name.endswith(".tmp") for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir() for p in folder.iterdir())


def _kill_once(cmd: list[str], run_dir: Path, during_write: bool, rng: random.Random, timeout: float = 600) -> str | None:
    """Start the command and SIGKILL it at the chosen moment; None if it finished first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, armed_at = time.time() + timeout, None
    while proc.poll() is None and time.time() < deadline:
        if during_write and _temp_file_present(run_dir):
            proc.send_signal(signal.SIGKILL)
            return "during a checkpoint write"
        if not during_write and (run_dir / "checkpoints" / "last.ckpt").exists():
            armed_at = armed_at or time.time() + rng.uniform(0.2, 3.0)
            if time.time() >= armed_at:
                proc.send_signal(signal.SIGKILL)
                return "mid-step"
        time.sleep(0.002)
    proc.wait()
    return None


def _uninterrupted(cmd: list[str]) -> None:
    """The reference run. train.py refuses bad overrides in one `error:` line (exit code 2),
    before any step: that line becomes this script's ValueError; any other failure a RuntimeError."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0:
        return
    errors = [line.removeprefix("error: ") for line in proc.stderr.splitlines() if line.startswith("error: ")]
    if proc.returncode == 2 and errors:
        raise ValueError(f"train.py refused the overrides: {errors[-1]}")
    raise RuntimeError(f"the uninterrupted train.py run failed with exit code {proc.returncode}: {(errors or proc.stderr.strip().splitlines() or ['no output'])[-1]}")


def drill(kills: int, steps: int, overrides: Sequence[str], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        whole, cut = Path(tmp) / "whole", Path(tmp) / "cut"
        _uninterrupted(_command(whole, steps, overrides))
        reference = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        events = []
        for i in range(kills):
            moment = _kill_once(_command(cut, steps, overrides), cut, during_write=i % 2 == 0, rng=rng)
            saved = [p.name for p in (cut / "checkpoints").glob("*.ckpt")] if (cut / "checkpoints").is_dir() else []
            events.append({"kill": i, "moment": moment or "finished first", "checkpoints_after_kill": sorted(saved)})
        final = subprocess.run(_command(cut, steps, overrides), cwd=ROOT, capture_output=True, text=True)
        results = json.loads((cut / "results.json").read_text())
        state = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        identical = all(torch.equal(reference[k], state[k]) for k in reference)
        shutil.rmtree(cut, ignore_errors=True)
    return {"kills": events, "final_exit": final.returncode, "final_status": results["status"], "final_step": results["step"],
            "weights_identical": identical, "steps": steps, "overrides": list(overrides)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="fault_drill.json")
    ap.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=debug-xs data.batch_size=8")
    args = ap.parse_intermixed_args(argv)  # overrides may stand before and after the options
    if args.kills < 1 or args.steps < 10:
        print(f"error: --kills={args.kills} must be >= 1 and --steps={args.steps} >= 10", file=sys.stderr)
        return 2
    if Path(args.out).is_dir():
        print(f"error: --out={args.out!r} is a directory; give the JSON file to write", file=sys.stderr)
        return 2
    from qat.io import atomic_write_json

    try:
        report = drill(args.kills, args.steps, args.overrides, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for e in report["kills"]:
        print(f"kill {e['kill']}: {e['moment']}; checkpoints left: {', '.join(e['checkpoints_after_kill']) or 'none'}")
    print(f"final run: exit {report['final_exit']}, status {report['final_status']}, step {report['final_step']}; "
          f"weights identical to the uninterrupted run: {report['weights_identical']}")  # fmt: skip
    atomic_write_json(args.out, report)
    return 0 if report["weights_identical"] and report["final_status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
