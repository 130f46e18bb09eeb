"""The model half of the lifecycle, in one place: plain model -> initialised -> quantized.

`build_net` is what train.py, checkpoint loading, the benchmarks and export all call, so a
model is built and converted the same way everywhere. Compiling and wrapping for the
trainer come after it, in train.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from models import MODEL_SIZES, Llama, LlamaConfig, llama_config
from qat.hf.load import check_checkpoint, load_hf_llama
from qat.quant.config import QuantizerConfig
from qat.quant.convert import quantize_model
from qat.quant.hadamard import check_block
from qat.quant.linear import QuantLinear

# Models above this many parameters are built on the meta device (no memory, no default
# init) and materialised once: the default nn.Linear init of a billion-parameter model
# costs minutes on a CPU and is overwritten anyway. Smaller models are built directly, so
# their weights (and every recorded loss curve) do not depend on this switch.
META_BUILD_PARAMS = 100_000_000


def net_config(model: Mapping[str, Any], vocab_size: int, max_seq_len: int) -> LlamaConfig:
    """LlamaConfig from the `model` group (size name plus field overrides)."""
    return llama_config(vocab_size=vocab_size, max_seq_len=max_seq_len, **dict(model))


def build_plain_net(cfg: LlamaConfig) -> Llama:
    """The plain model, initialised (QuEST init), on the CPU."""
    with torch.device("meta"):
        probe = Llama(cfg)
    if probe.num_params(non_embedding=False) <= META_BUILD_PARAMS:
        return Llama(cfg)
    probe.to_empty(device="cpu")
    probe.init_weights()
    return probe


def check_quantizable(net: nn.Module, weight: QuantizerConfig, activation: QuantizerConfig) -> None:
    """Every quantized layer's dims against the quantizer configs, once, at build time."""
    for name, layer in net.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        for side, qcfg in (("weight", weight), ("activation", activation)):
            dim = layer.in_features
            try:
                if qcfg.rotation == "hadamard":
                    check_block(dim, qcfg.block_for(dim))
                if qcfg.granularity != "row" and dim % qcfg.granularity:
                    raise ValueError(f"granularity={qcfg.granularity} does not divide the input dim {dim}")
                if qcfg.sparsity == "2:4" and dim % 4:
                    raise ValueError(f"sparsity='2:4' needs an input dim divisible by 4, got {dim}")
            except ValueError as err:
                raise ValueError(f"quant.{side} on layer {name} (input dim {dim}): {err}") from None


# --- Hugging Face checkpoints (model=hf): architecture and weights from model.path -------------
HF_MODEL = "hf"
HF_MODEL_KEYS = ("size", "path", "peak_lr")


def is_hf_model(model: Mapping[str, Any]) -> bool:
    """`model=hf`: a local Hugging Face Llama directory instead of a size-table row."""
    return model.get("size") == HF_MODEL


def check_model(cfg: DictConfig) -> None:
    """model.size is a size-table row, or model=hf names a checkpoint we can load (files,
    config and tensor headers only: no weights are read). One line for anything else."""
    model = cfg.model
    if not is_hf_model(model):
        if model.size not in MODEL_SIZES:
            raise ValueError(f"model.size={model.size!r} is not allowed; choose one of {', '.join(MODEL_SIZES)}")
        return
    unknown = sorted(set(model) - set(HF_MODEL_KEYS))
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not a key of model=hf (config.json fixes the architecture); allowed: {', '.join(HF_MODEL_KEYS)}")
    check_checkpoint(model.path, seq_len=cfg.data.seq_len)


def peak_lr(model: Mapping[str, Any]) -> float:
    """The LR when optimizer.lr is null: the size table's, or model=hf's own `peak_lr`."""
    return float(model["peak_lr"]) if is_hf_model(model) else MODEL_SIZES[model["size"]].peak_lr


def model_config(model: Mapping[str, Any], vocab_size: int, max_seq_len: int) -> LlamaConfig:
    """`net_config`, or for model=hf the checkpoint's (its config.json and headers only)."""
    if is_hf_model(model):
        return check_checkpoint(model["path"], vocab_size=vocab_size)[0]
    return net_config(model, vocab_size, max_seq_len)
# --- end Hugging Face checkpoints ----------------------------------------------------------------


def build_net(cfg: DictConfig | Mapping[str, Any], vocab_size: int, device: str | torch.device = "cpu") -> nn.Module:
    """The model a run trains: `cfg.model` built plain, initialised (model=hf: the checkpoint's
    weights), then every block linear swapped for a QuantLinear with `cfg.quant`'s weight and
    activation configs.

    device="meta" builds the same structure with no memory and no init: a free check of
    every layer's dims against the quantizers before any data is read."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    net_cfg = model_config(model, vocab_size, cfg.data.seq_len)
    if str(device) == "meta":
        with torch.device("meta"):
            net = Llama(net_cfg)
    elif is_hf_model(model):
        net = load_hf_llama(model["path"], vocab_size=vocab_size)  # pretrained: no random init
    else:
        net = build_plain_net(net_cfg)
    weight, activation = (QuantizerConfig.from_mapping(OmegaConf.to_container(cfg.quant[s], resolve=True)) for s in ("weight", "activation"))
    quantize_model(net, weight, activation)
    check_quantizable(net, weight, activation)
    return net


def quantization_metadata(net: nn.Module) -> dict[str, Any]:
    """What the checkpoint records of the quantization, read off the net's own layers:
    the weight and activation configs and the quantized layers' names."""
    layers = {name: m for name, m in net.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return {"weight": QuantizerConfig.from_mapping(None).to_dict(), "activation": QuantizerConfig.from_mapping(None).to_dict(), "layers": []}
    first = next(iter(layers.values()))
    return {
        "weight": first.weight_quantizer.cfg.to_dict(),
        "activation": first.input_quantizer.cfg.to_dict(),
        "layers": list(layers),
    }
