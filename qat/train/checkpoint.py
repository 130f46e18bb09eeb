"""Checkpoint files: written atomically, found for resume, and turned back into the model.

Checkpoints hold plain containers only (loadable with torch.load(weights_only=True)): the
resolved run config, the quantization metadata, and the LightningModule state dict. A model
is rebuilt from them by the same `build_net` that train.py uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf
from torch import nn

from qat.io import atomic_write
from qat.train.lifecycle import build_net, quantization_metadata

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
NET_PREFIX = "net."  # the LightningModule holds the model as `net`


class LoadedModel(NamedTuple):
    net: nn.Module
    tokenizer: Any
    config: dict
    step: int


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a train.py checkpoint, quantized as it was trained, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "config" not in ckpt or "quantization" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} was not written by train.py (no config/quantization entries)")
    cfg = ckpt["config"]
    tokenizer = instantiate(OmegaConf.create(cfg["tokenizer"]))
    net = build_net(cfg, tokenizer.vocab_size)
    quant = ckpt["quantization"]
    layers = quantization_metadata(net)["layers"]
    if layers != list(quant["layers"]):
        raise ValueError(f"checkpoint quantized {len(quant['layers'])} layers but the model now has {len(layers)} candidates")
    state = {k[len(NET_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)}
    net.load_state_dict(state)
    return LoadedModel(net.to(device).eval(), tokenizer, cfg, int(ckpt["global_step"]))


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file, then rename: a killed job never leaves a torn last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    return path if path.is_file() else None


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
