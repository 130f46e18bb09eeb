"""Rebuild a trained (quantized) model from a checkpoint, for generation, evaluation, export.

Checkpoints hold plain containers only (loadable with torch.load(weights_only=True)): the
resolved run config, the quantizer configs, and the LightningModule state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from models import Llama, llama_config
from qat.config import QuantizerConfig
from qat.convert import quantize_model

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
    net = Llama(llama_config(vocab_size=tokenizer.vocab_size, max_seq_len=cfg["data"]["seq_len"], **cfg["model"]))
    quant = ckpt["quantization"]
    weight, activation = QuantizerConfig.from_mapping(quant["weight"]), QuantizerConfig.from_mapping(quant["activation"])
    swapped = quantize_model(net, weight, activation)
    if swapped != list(quant["layers"]):
        raise ValueError(f"checkpoint quantized {len(quant['layers'])} layers but the model now has {len(swapped)} candidates")
    state = {k[len(NET_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)}
    net.load_state_dict(state)
    return LoadedModel(net.to(device).eval(), tokenizer, cfg, int(ckpt["global_step"]))
