"""`QATModule`: the LightningModule that trains a (quantized) language model.

It receives its parts (lightning-hydra-template style): the network, already built,
quantized and compiled by train.py's lifecycle (`qat.train.lifecycle.build_net`), an
optimizer partial and a scheduler partial. It adds the loss, the logging and the
checkpoint metadata, which it reads off the net's own quantizers.

Logged: train/loss, val/loss, val/ppl, lr, perf/tokens_per_s, perf/mfu (analytic FLOPs); with a
teacher (distill=kd, qat/train/distill.py) also train/kd, train/ce, val/kl (the mean per-token
KL(teacher || model)) and val/top1_agree (the share of positions where both pick the same token).
Quantizer telemetry is a callback (qat.train.telemetry).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from qat.inference.agreement import token_kl
from qat.train.distill import Teacher, distill_loss
from qat.train.lifecycle import quantization_metadata
from qat.train.lora import LORA_BASE, adapter_state
from qat.train.optim import build_optimizer

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
        flops_per_token: float | None = None,
        extra_checkpoint: Mapping[str, Any] | None = None,
        teacher: Teacher | None = None,
        lora_base: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.teacher = teacher  # a plain object, never a submodule (not trained, saved or sharded)
        # A LoRA run (qat/train/lora.py): checkpoints hold the adapters and quantizer state only,
        # with the frozen base's identity; loading one fills the rest from the base built here.
        self.lora_base = dict(lora_base) if lora_base is not None else None
        self.strict_loading = lora_base is None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.flops_per_token = flops_per_token
        self.extra_checkpoint = dict(extra_checkpoint or {})
        self._window_start: float | None = None
        self._window_tokens = 0

    # ----- model -----
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        # fp32 at least (bf16 logits lose the log-sum-exp); fp64 runs stay fp64 end to end.
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self._logits(x).flatten(0, 1), y.flatten())

    # ----- training -----
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.teacher is None:
            loss = self._loss(batch)
        else:
            x, y = batch
            loss, kd, ce = distill_loss(self._logits(x), self.teacher.logits(x), y, self.teacher.cfg)
            self.log("train/kd", kd.detach(), prog_bar=True, sync_dist=False)
            self.log("train/ce", ce.detach(), sync_dist=False)
        self.log("train/loss", loss, prog_bar=True, sync_dist=False)
        self._window_tokens += batch[0].numel()
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

    # ----- validation -----
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_kl = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_agree = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # Token-weighted means over every val batch of every rank (summed, then divided once).
        x, y = batch
        logits = self._logits(x)
        self._val_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten()).double() * y.numel()
        self._val_count += y.numel()
        if self.teacher is not None:
            reference = self.teacher.logits(x)
            self._val_kl += token_kl(logits, reference).sum()
            self._val_agree += (logits.argmax(-1) == reference.argmax(-1)).sum().double()

    def on_validation_epoch_end(self) -> None:
        reduce = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        count = reduce(self._val_count).clamp_min(1)
        loss = (reduce(self._val_sum) / count).float()
        self.log("val/loss", loss, prog_bar=True, rank_zero_only=True)
        self.log("val/ppl", torch.exp(loss.clamp_max(50.0)), rank_zero_only=True)
        if self.teacher is not None:
            self.log("val/kl", (reduce(self._val_kl) / count).float(), prog_bar=True, rank_zero_only=True)
            self.log("val/top1_agree", (reduce(self._val_agree) / count).float(), rank_zero_only=True)

    # ----- optimizer -----
    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.net, self.optimizer_factory)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.max_steps)  # the schedule checks it
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoints: plain containers only (torch.load(weights_only=True)) -----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["quantization"] = quantization_metadata(self.net)
        if self.teacher is not None:
            checkpoint["distill_teacher"] = dict(self.teacher.identity)  # its identity, never its weights
        if self.lora_base is not None:
            checkpoint["state_dict"] = adapter_state(checkpoint["state_dict"])
            checkpoint[LORA_BASE] = dict(self.lora_base)
        checkpoint.update(self.extra_checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Loading is not strict for a LoRA run (the base is not in the file): every adapter must
        # be. FSDP has loaded the state before this hook and removed it from the dict.
        if self.lora_base is not None and "state_dict" in checkpoint:
            missing = sorted(set(adapter_state(self.state_dict())) - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"the checkpoint lacks {missing[0]} ({len(missing)} adapter entries missing)")
