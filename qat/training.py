"""The pieces `train.py` strings together: config checks, step budget, resume, results.

Kept out of train.py so that train.py reads as the lifecycle and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from qat.config import QuantizerConfig
from qat.io import atomic_write, atomic_write_json
from qat.precision import precision_key

RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
DISTRIBUTED_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS")


class ConfigError(ValueError):
    """A bad override, reported as one line before any expensive work."""


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Turn the ways a bad override surfaces (ValueError, Hydra's InstantiationException
    wrapping one, a missing ??? value) into a one-line ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):  # nested instantiate() calls
            cause = cause.__cause__
        if isinstance(cause, (ValueError, MissingMandatoryValue)):
            raise ConfigError(_one_line(cause)) from None
        raise
    except (MissingMandatoryValue, ValueError) as err:
        raise ConfigError(_one_line(err)) from None


def _one_line(err: BaseException) -> str:
    if isinstance(err, MissingMandatoryValue):
        return f"missing value for {err.full_key}: set {err.full_key}=..."
    return str(err).strip().splitlines()[0]


def quantizer_configs(cfg: DictConfig) -> tuple[QuantizerConfig, QuantizerConfig]:
    """(weight, activation) configs from the `quant` group, named in errors."""
    out = []
    for side in ("weight", "activation"):
        try:
            out.append(QuantizerConfig.from_mapping(OmegaConf.to_container(cfg.quant[side], resolve=True)))
        except ValueError as err:
            raise ConfigError(f"quant.{side}: {err}") from None
    return out[0], out[1]


def check_positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def resolve_max_steps(cfg: DictConfig, non_embedding_params: int) -> int:
    """trainer.max_steps, or the steps that `tokens_per_param` / `max_tokens` ask for."""
    tokens = cfg.get("max_tokens")
    if cfg.get("tokens_per_param") is not None:
        tokens = cfg.tokens_per_param * non_embedding_params
    if tokens is None:
        steps = cfg.trainer.get("max_steps")
        if steps is None or steps < 1:
            raise ConfigError(f"trainer.max_steps={steps!r} must be >= 1 (or set max_tokens / tokens_per_param)")
        return int(steps)
    per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.get("accumulate_grad_batches", 1)
    return max(1, math.ceil(tokens / per_step))


def check_launch(cfg: DictConfig, multirun: bool) -> None:
    """Hydra multirun + a subprocess-launching strategy would re-run the whole sweep in
    every rank; such jobs must be started by torchrun or srun (which set the ranks)."""
    strategy = cfg.trainer.get("strategy")
    name = strategy if isinstance(strategy, str) else str(OmegaConf.select(cfg, "trainer.strategy._target_", default=""))
    multi = "ddp" in name.lower() or "fsdp" in name.lower()
    if multirun and multi and not any(k in os.environ for k in DISTRIBUTED_ENV):
        raise ConfigError(
            "trainer=ddp/fsdp inside a Hydra multirun must be launched by torchrun or srun "
            "(e.g. hydra/launcher=slurm); a plain multirun would re-launch the sweep in every rank"
        )


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    return path if path.is_file() else None


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def read_results(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_completed(run_dir: Path) -> bool:
    results = read_results(run_dir)
    return results is not None and results.get("status") == "completed"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file, then rename: a killed job never leaves a torn last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class RunRecord:
    """Accumulates what results.json reports and writes it atomically (rank 0 only)."""

    def __init__(
        self, run_dir: Path, cfg: DictConfig, weight: QuantizerConfig, activation: QuantizerConfig, rank: int, overrides: list[str]
    ) -> None:
        self.path = run_dir / RESULTS_FILE
        self.rank = rank
        self.start = time.time()
        self.data: dict[str, Any] = {
            "status": "running",
            "model": cfg.model.size,
            "quant_preset": cfg.quant.name,
            "w_bits": float(weight.bits),
            "a_bits": float(activation.bits),
            "precision": precision_key(weight, activation),
            "seed": cfg.seed,
            "run_dir": str(run_dir),
            "overrides": list(overrides),
            "quantization": {"weight": weight.to_dict(), "activation": activation.to_dict()},
        }

    def update(self, **values: Any) -> None:
        self.data.update(values)

    def write(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
        self.data["wall_time_s"] = round(time.time() - self.start, 3)
        if self.rank == 0:
            atomic_write_json(self.path, self.data)


class StepRecorder(Callback):
    """Keeps results.json's step/tokens current at every checkpoint-sized interval."""

    def __init__(self, record: RunRecord, tokens_per_step: int, every: int) -> None:
        self.record, self.tokens_per_step, self.every = record, tokens_per_step, max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step % self.every == 0:
            self.record.update(step=trainer.global_step, tokens=trainer.global_step * self.tokens_per_step)
            self.record.write()


def fail(message: str) -> None:
    """One line on stderr, exit code 2 (bad input), nothing trained."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
