"""Faults a run must survive or report: divergence and signals.

- A non-finite gradient norm (checked before the optimizer step, so the weights stay
  finite) or a non-finite loss stops the run within that step: `Diverged`. No checkpoint
  is written after it, so last.ckpt keeps the last finite weights; train.py records
  status "diverged" and exits non-zero.
- SIGTERM, SIGINT (and SIGUSR1 outside SLURM) are turned into a flag; at the end of the
  current step the run saves a checkpoint at that step and stops: `Interrupted`. train.py
  records status "interrupted" and exits 128 + the signal number. Under SLURM with
  auto-requeue, SIGUSR1 stays Lightning's: it saves hpc_ckpt_<n>.ckpt and requeues the job,
  and the requeued run resumes from that newest checkpoint (see checkpoint.py).
"""

from __future__ import annotations

import math
import signal
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment


class Diverged(RuntimeError):
    """The loss or the gradient norm became non-finite at `step`."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"training diverged at step {step}: {what} is not finite; the last finite checkpoint is kept")
        self.step = step


class Interrupted(RuntimeError):
    """A stop signal arrived; a checkpoint at `step` was saved."""

    def __init__(self, signum: int, step: int, path: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: saved a checkpoint at step {step} ({path}); re-run the same command to resume")
        self.signum, self.step = signum, step


def grad_norm(module: torch.nn.Module) -> float:
    """The global L2 norm of all gradients (0 when there are none)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class DivergenceGuard(Callback):
    """Stops the run at the first non-finite gradient norm or loss."""

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Every rank decides together: under FSDP each sees only its shard of the gradients,
        # and a rank stopping alone would leave the others waiting forever.
        bad = torch.tensor(0.0 if math.isfinite(grad_norm(pl_module)) else 1.0, device=pl_module.device)
        if trainer.strategy.reduce(bad, reduce_op="max").item() > 0:
            raise Diverged(trainer.global_step, "the gradient norm")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            raise Diverged(trainer.global_step, "the loss")


class SignalCheckpoint(Callback):
    """Turns stop signals into a checkpoint at the current step, then `Interrupted`."""

    def __init__(self, checkpoint_path: str) -> None:
        self.checkpoint_path = checkpoint_path
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _signals(self, trainer: Any) -> list[int]:
        env = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        return [signal.SIGTERM, signal.SIGINT] + ([] if slurm_requeue else [signal.SIGUSR1])

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # After Lightning's own handlers are installed, so these take precedence.
        for signum in self._signals(trainer):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        stop = torch.tensor(float(self.signum or 0), device=pl_module.device)
        stop = trainer.strategy.reduce(stop, reduce_op="max")  # every rank stops at the same step
        if stop.item() == 0:
            return
        signum = int(stop.item())
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # full state: the run resumes from it
        raise Interrupted(signum, trainer.global_step, self.checkpoint_path)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
