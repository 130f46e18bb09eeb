"""Load a packed model directory (format.py) as a runnable Llama with PackedLinear layers.

The model is built on the meta device (no memory, no random init), every quantized layer
is swapped for an empty PackedLinear of the format's shapes, and the file's tensors are
assigned in place: nothing is computed at load beyond validating what was read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from qat.models.llama import Llama, LlamaConfig
from qat.packed.format import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE
from qat.packed.linear import PackedLinear, layer_backend
from qat.quant.config import QuantizerConfig


class PackedModel(NamedTuple):
    net: nn.Module
    tokenizer: Any
    config: dict  # the training run's config (as LoadedModel.config)
    step: int


def _field(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(doc, Mapping) or key not in doc:
        raise ValueError(f"{where} has no {key!r} entry; the packed model is incomplete or not ours")
    return doc[key]


def read_config(root: Path) -> dict[str, Any]:
    """config.json, checked for the format version this code reads."""
    path = root / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{str(root)!r} is not a packed model directory (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err})") from None
    if isinstance(config, Mapping) and "format_version" not in config and "model_type" in config:
        raise ValueError(f"{str(root)!r} is a Hugging Face model directory, not a packed export (scripts/export.py writes one)")
    version = _field(config, "format_version", repr(str(path)))
    if version != FORMAT_VERSION:
        raise ValueError(f"format_version={version!r} is not supported; this code reads format_version {FORMAT_VERSION}")
    return config


def read_tensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist; the packed model is incomplete")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} cannot be read as safetensors ({' '.join(str(err).split())})") from None


def load_tokenizer(root: Path, entry: Mapping[str, Any]) -> Any:
    from qat.data.tokenizer import ByteTokenizer, HFTokenizer

    kind = _field(entry, "type", "config.json tokenizer")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        file, eos = _field(entry, "file", "config.json tokenizer"), _field(entry, "eos_token", "config.json tokenizer")
        return HFTokenizer(str(root / file), eos, entry.get("bos_token"))  # no bos_token: written before it existed
    raise ValueError(f"tokenizer type={kind!r} is not allowed; this code reads 'bytes' and 'hf'")


def packed_layer(name: str, entry: Mapping[str, Any], backend: str = "torch") -> PackedLinear:
    """An empty PackedLinear for one config.json layer entry (backend: linear.layer_backend's)."""
    where = f"config.json layer {name!r}"
    return PackedLinear(
        int(_field(entry, "in_features", where)),
        int(_field(entry, "out_features", where)),
        QuantizerConfig.from_mapping(_field(entry, "weight", where)),
        QuantizerConfig.from_mapping(_field(entry, "activation", where)),
        bias=bool(_field(entry, "bias", where)),
        weight_dtype=_field(entry, "weight_dtype", where),
        backend=backend,
    )


def _swap_in(net: nn.Module, name: str, layer: PackedLinear) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        old = net.get_submodule(name)
    except AttributeError:
        raise ValueError(f"config.json layer {name!r} is not a module of the model") from None
    if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (layer.in_features, layer.out_features):
        raise ValueError(f"config.json layer {name!r} ({layer.in_features} -> {layer.out_features}) does not match the model's {old}")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, layer)


def load_packed(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> PackedModel:
    """The packed model in `path` (written by export_packed), in eval mode, on `device`.
    backend: "auto" | "torch" | "triton", resolved here, once, for every layer (linear.py)."""
    root = Path(path)
    backend = layer_backend(backend, device)
    config = read_config(root)
    try:
        model_cfg = LlamaConfig(**_field(config, "model", CONFIG_FILE))
    except TypeError as err:
        raise ValueError(f"config.json model entry does not fit LlamaConfig ({err})") from None
    layers = _field(config, "layers", CONFIG_FILE)
    trained = _field(config, "trained", CONFIG_FILE)
    with torch.device("meta"):
        net = Llama(model_cfg)
        for name, entry in layers.items():
            _swap_in(net, name, packed_layer(name, entry, backend))
    tensors = read_tensors(root / WEIGHTS_FILE, device)
    if model_cfg.tie_embeddings and "embed.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{WEIGHTS_FILE} does not match config.json: {' '.join(str(err).split())[:300]}") from None
    if model_cfg.tie_embeddings:
        net.lm_head.weight = net.embed.weight
    net.rope_cache = torch.empty(0, device=device)  # built on first use, on the right device
    for name in layers:
        net.get_submodule(name).check(name)
    net.requires_grad_(False).eval()
    tokenizer = load_tokenizer(root, _field(config, "tokenizer", CONFIG_FILE))
    if tokenizer.vocab_size > model_cfg.vocab_size:  # a padded embedding table is fine
        raise ValueError(f"the tokenizer's vocab_size={tokenizer.vocab_size} exceeds the model's vocab_size={model_cfg.vocab_size}")
    return PackedModel(net, tokenizer, _field(trained, "run_config", "config.json trained"), int(_field(trained, "step", "config.json trained")))
