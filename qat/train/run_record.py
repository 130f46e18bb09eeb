"""The run record: results.json, kept current during a run and written atomically.

Status: running -> completed | failed | diverged | interrupted. A re-run that fails never
destroys a finished result: the completed record it started from is written back. Times
add up over the segments of a resumed run (wall_time_s, train_time_s), and tokens_per_s is
over all of them. The file is strict JSON: a non-finite number is written as null.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from qat.io import atomic_write_json
from qat.scaling.precision import LayerPrecision, run_precision
from qat.train.run_config import quant_rules

RESULTS_FILE = "results.json"
FAILED_STATUSES = ("failed", "diverged", "interrupted")


def read_results(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_completed(run_dir: Path) -> bool:
    results = read_results(run_dir)
    return results is not None and results.get("status") == "completed"


class RunRecord:
    """Accumulates what results.json reports and writes it atomically (rank 0 only).

    `layers` (lifecycle.layer_precisions) gives the precision key and bits: a uniform run's
    own, a mixed run's parameter-weighted means (qat.scaling.precision). `quantization`
    (lifecycle.quantization_metadata) is recorded as is: each layer's resolved configs."""

    def __init__(
        self, run_dir: Path, cfg: DictConfig, layers: Sequence[LayerPrecision], quantization: dict[str, Any], rank: int, overrides: list[str]
    ) -> None:
        self.path = run_dir / RESULTS_FILE
        self.rank = rank
        self.start = time.time()
        self.previous = read_results(run_dir)  # a completed record is restored if this run fails
        self.earlier_wall_time = 0.0  # set by `resumed_from` for a run continuing earlier segments
        precision = run_precision(layers)
        self.data: dict[str, Any] = {
            "status": "running",
            "model": cfg.model.size,
            "quant_preset": cfg.quant.name,
            "w_bits": precision.w_bits,
            "a_bits": precision.a_bits,
            "memory_bits": precision.memory_bits,
            "precision": precision.key,
            "seed": cfg.seed,
            "run_dir": str(run_dir),
            "overrides": list(overrides),
            "quantization": {**quantization, "rules": [rule.to_dict() for rule in quant_rules(cfg)]},
        }

    def resumed_from(self, step: int) -> None:
        """This run continues earlier segments: count their wall and training time."""
        prev = self.previous or {}
        self.earlier_wall_time = float(prev.get("wall_time_s") or 0.0)
        self.data["train_time_s"] = float(prev.get("train_time_s") or 0.0)
        self.data["resumed_from_step"] = step

    def add_train_time(self, seconds: float) -> None:
        self.data["train_time_s"] = self.data.get("train_time_s", 0.0) + seconds

    def update(self, **values: Any) -> None:
        self.data.update(values)

    def write(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
        self.data["wall_time_s"] = round(self.earlier_wall_time + time.time() - self.start, 3)
        if self.rank != 0:
            return
        failed = self.data["status"] in FAILED_STATUSES
        if failed and self.previous is not None and self.previous.get("status") == "completed":
            print(f"{self.path} keeps its completed result; this run ended {self.data['status']}", file=sys.stderr)
            atomic_write_json(self.path, self.previous)
            return
        atomic_write_json(self.path, self.data)


class StepRecorder(Callback):
    """Keeps results.json's step/tokens current at every checkpoint-sized interval."""

    def __init__(self, record: RunRecord, tokens_per_step: int, every: int) -> None:
        self.record, self.tokens_per_step, self.every = record, tokens_per_step, max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step % self.every == 0:
            self.record.update(step=trainer.global_step, tokens=trainer.global_step * self.tokens_per_step)
            self.record.write()


EXIT_BAD_INPUT = 2  # nothing trained
EXIT_DIVERGED = 3  # trained until the loss or gradient went non-finite


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr, then exit with `code` (2: bad input, 3: diverged, 128+N: signal N)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
