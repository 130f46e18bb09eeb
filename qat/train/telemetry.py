"""Quantizer telemetry as a Lightning callback, outside the quantizers and the compiled graph.

Every `every` optimizer steps (first micro-batch only) the callback runs one extra eager,
no-grad forward of the training batch with forward hooks on the quantizers, and computes
each one's statistics from `fake_quantize` on the very input the training step quantizes:

    quant/<layer>.<input|weight>_quantizer/masked_fraction   share of elements whose gradient the estimator zeroes
    quant/<layer>.<input|weight>_quantizer/rel_error         ||q - x_rot||^2 / ||x_rot||^2
    quant/mean_masked_fraction, quant/mean_rel_error         their means over quantizers

The training step itself is untouched: no flag toggles, no second compiled graph, and no
statistic is computed on other steps. Cost: one forward on telemetry steps.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from qat.quant.convert import quantizers
from qat.quant.quantizer import Quantizer, fake_quantize, rotate
from qat.train.alignment import alignment_metrics, gradient_alignment


@torch.no_grad()
def quantizer_stats(quantizer: Quantizer, x: torch.Tensor) -> dict[str, float]:
    """Masked fraction and relative squared error of one quantizer on its input x."""
    cfg = quantizer.cfg
    qz = fake_quantize(x, cfg, quantizer.grid, quantizer.held_scale(x))
    ref = rotate(x, cfg).double()
    return {
        "masked_fraction": float(1.0 - qz.grad_mask.float().mean()),
        "rel_error": float((qz.value.double() - ref).square().sum() / ref.square().sum().clamp_min(1e-30)),
    }


@torch.no_grad()
def collect_stats(net: nn.Module, idx: torch.Tensor, forward: Any = None) -> dict[str, dict[str, float]]:
    """Per-quantizer statistics for one forward of `net` on `idx` (eager, hooks removed after)."""
    stats: dict[str, dict[str, float]] = {}
    handles = []
    for name, quantizer in quantizers(net).items():
        if not quantizer.cfg.enabled:
            continue

        def hook(module: Quantizer, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, name: str = name) -> None:
            stats[name] = quantizer_stats(module, inputs[0])

        handles.append(quantizer.register_forward_hook(hook))
    try:
        # The module's own forward bypasses a compiled __call__; under FSDP the call must go
        # through the root wrapper (`forward`), which gathers the sharded parameters.
        (forward or net.forward)(idx)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def telemetry_metrics(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    means: dict[str, list[float]] = {}
    for name, values in stats.items():
        for key, value in values.items():
            metrics[f"quant/{name}/{key}"] = value
            means.setdefault(key, []).append(value)
    metrics.update({f"quant/mean_{key}": sum(v) / len(v) for key, v in means.items()})
    return metrics


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


class QuantTelemetry(Callback):
    """Logs quantizer statistics every `every` optimizer steps and the gradient alignment
    every `alignment_every` steps (0 = never)."""

    def __init__(self, every: int, alignment_every: int = 0) -> None:
        self.every, self.alignment_every = every, alignment_every

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches:
            return  # the first micro-batch of an optimizer step only
        step, metrics = trainer.global_step, {}
        if _due(self.every, step):
            model = trainer.strategy.model
            forward = model if isinstance(model, FullyShardedDataParallel) else None
            metrics.update(telemetry_metrics(collect_stats(pl_module.net, batch[0], forward)))
        if _due(self.alignment_every, step):
            metrics.update(alignment_metrics(gradient_alignment(pl_module.net, batch[0], batch[1])))
        # Straight to the loggers: point samples of one step, not running means.
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def final_alignment(net: nn.Module, datamodule: Any) -> dict[str, float]:
    """The gradient alignment means (align/mean_*) on the first validation batch, for results.json."""
    x, y = next(iter(datamodule.val_dataloader()))
    device = next(net.parameters()).device
    metrics = alignment_metrics(gradient_alignment(net, x.to(device), y.to(device)))
    return {k: v for k, v in metrics.items() if k.startswith("align/mean_")}
