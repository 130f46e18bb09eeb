"""`QATModule`: the LightningModule that trains a (quantized) language model.

It receives its parts (lightning-hydra-template style): the plain network, an optimizer
partial, a scheduler partial and the weight / activation quantizer configs. The lifecycle
is fixed and happens here, in this order:

    build model (caller) -> quantize (convert nn.Linear -> QuantLinear) -> compile ->
    optimizer (decay groups) -> scheduler

Logged: train/loss, val/loss, val/ppl, lr, perf/tokens_per_s, perf/mfu (analytic FLOPs),
and every `telemetry_every` optimizer steps per-layer quantizer telemetry (quant/<layer>/
masked_fraction: the share of elements the trust mask zeroes; rel_error: ||q - x||^2 /
||x||^2), plus their means.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from qat.config import QuantizerConfig
from qat.convert import quantize_model, quantizers
from qat.optim import build_optimizer

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class QATModule(L.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        weight_quant: QuantizerConfig | Mapping[str, Any] | None,
        activation_quant: QuantizerConfig | Mapping[str, Any] | None,
        weight_decay: float = 0.1,
        compile: bool = False,
        telemetry_every: int = 50,
        flops_per_token: float | None = None,
        extra_checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.weight_quant = QuantizerConfig.from_mapping(weight_quant)
        self.activation_quant = QuantizerConfig.from_mapping(activation_quant)
        self.quantized_layers = quantize_model(self.net, self.weight_quant, self.activation_quant)
        if compile:
            self.net.compile()  # in place: state-dict keys stay those of the plain model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = weight_decay
        self.telemetry_every = telemetry_every
        self.flops_per_token = flops_per_token
        self.extra_checkpoint = dict(extra_checkpoint or {})
        self._quantizers = quantizers(self.net)
        self._window_start: float | None = None
        self._window_tokens = 0

    # ----- model -----
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        # fp32 at least (bf16 logits lose the log-sum-exp); fp64 runs stay fp64 end to end.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    # ----- training -----
    def _telemetry_step(self, batch_idx: int) -> bool:
        first_micro = batch_idx % self.trainer.accumulate_grad_batches == 0
        return self.telemetry_every > 0 and first_micro and self.global_step % self.telemetry_every == 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        track = self._telemetry_step(batch_idx)
        for q in self._quantizers.values():
            q.track_stats = track
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=False)
        self._window_tokens += batch[0].numel()
        if self._telemetry_step(batch_idx):
            self._log_telemetry()
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0 and self._window_start is not None:
            self._log_throughput()

    def _log_throughput(self) -> None:
        # Counts every micro-batch's tokens over wall time, so gradient accumulation and the
        # world size enter once: tokens/s is global, MFU divides by every device's peak.
        elapsed = time.perf_counter() - self._window_start
        tokens_per_s = self._window_tokens * self.trainer.world_size / max(elapsed, 1e-9)
        self.log("perf/tokens_per_s", tokens_per_s, prog_bar=True, rank_zero_only=True)
        peak = device_peak_flops(self.device)
        if peak and self.flops_per_token:
            self.log("perf/mfu", self.flops_per_token * tokens_per_s / (peak * self.trainer.world_size), rank_zero_only=True)
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def _log_telemetry(self) -> None:
        # Straight to the loggers: these are point samples of one step, not running means.
        metrics: dict[str, float] = {}
        means: dict[str, list[float]] = {}
        for name, q in self._quantizers.items():
            for key, value in q.stats.items():
                metrics[f"quant/{name}/{key}"] = float(value)
                means.setdefault(key, []).append(float(value))
            q.stats = {}
        metrics.update({f"quant/mean_{key}": sum(v) / len(v) for key, v in means.items()})
        if metrics and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    # ----- validation -----
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # Token-weighted mean over every val batch of every rank (summed, then divided once).
        tokens = batch[1].numel()
        self._val_sum += self._loss(batch).double() * tokens
        self._val_count += tokens

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        loss = (total / count.clamp_min(1)).float()
        self.log("val/loss", loss, prog_bar=True, rank_zero_only=True)
        self.log("val/ppl", torch.exp(loss.clamp_max(50.0)), rank_zero_only=True)

    # ----- optimizer -----
    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.net, self.optimizer_factory, self.weight_decay)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps
        if total is None or total < 1:
            raise ValueError(f"trainer.max_steps={total} must be >= 1 to define the LR schedule")
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoints: plain containers only (torch.load(weights_only=True)) -----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["quantization"] = {
            "weight": self.weight_quant.to_dict(),
            "activation": self.activation_quant.to_dict(),
            "layers": list(self.quantized_layers),
        }
        checkpoint.update(self.extra_checkpoint)
