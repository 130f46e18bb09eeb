"""Read a local Hugging Face Llama directory (written by `save_pretrained`) into our Llama.

    config.json                      the architecture (qat/hf/config.py decides what we accept)
    model.safetensors                the weights, or
    model.safetensors.index.json     + the shards its weight_map names

Everything cheap is checked before any weight is read: the files exist, the config is one
we compute exactly, every shard the index lists is present, and every tensor's name and
shape (from the safetensors headers) matches the config. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qat.models.llama import Llama, LlamaConfig
from qat.data.paths import absolute_path
from qat.hf.config import llama_config_from_hf
from qat.hf.convert import hf_shapes, our_target, qkv_rows, to_ours

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_dir(path: str | Path, key: str = "model.path") -> Path:
    """The directory, resolved like every path in our configs; one line naming `key` if it is not one."""
    resolved = Path(absolute_path(str(path)))
    if resolved.is_file() and resolved.suffix.lower() == ".gguf":
        raise ValueError(f"{key}={str(path)!r} is a GGUF file; import it first: python scripts/import_gguf.py {path} --out DIR, then {key}=DIR")
    if not resolved.is_dir():
        raise ValueError(f"{key}={str(path)!r} is not a directory (expected a Hugging Face model saved with save_pretrained)")
    return resolved


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist ({what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not readable JSON ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str | Path) -> tuple[dict[str, Any], LlamaConfig]:
    """(config.json as parsed, our LlamaConfig for it)."""
    directory = checkpoint_dir(path)
    hf = read_json(directory / CONFIG_FILE, "the model's config")
    try:
        return hf, llama_config_from_hf(hf)
    except ValueError as err:
        raise ValueError(f"{directory / CONFIG_FILE}: {err}") from None


def weight_files(path: str | Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists (each must exist)."""
    directory = checkpoint_dir(path)
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if not (directory / INDEX_FILE).is_file():
        found = sorted(p.name for p in directory.glob("*.bin"))
        hint = f"; found {found[0]}: only safetensors is supported (save_pretrained writes it by default)" if found else ""
        raise ValueError(f"{str(directory)!r} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")
    weight_map = read_json(directory / INDEX_FILE, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{directory / INDEX_FILE}: weight_map={weight_map!r} must map tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if not isinstance(name, str) or Path(name).name != name or not (directory / name).is_file():
            raise ValueError(f"shard {name!r} listed in {directory / INDEX_FILE} is absent from {str(directory)!r}")
    return [directory / name for name in shards]


def check_tensors(files: list[Path], cfg: LlamaConfig) -> None:
    """Names and shapes of every stored tensor against the config, from the headers only."""
    expected = hf_shapes(cfg)
    seen: set[str] = set()
    for file in files:
        for key, shape in tensor_headers(file).items():
            if our_target_or_error(key, file) is None:
                continue
            if key == "lm_head.weight" and cfg.tie_embeddings:
                expected_shape = (cfg.vocab_size, cfg.d_model)  # tied: checked equal after loading
            elif key not in expected:
                raise ValueError(f"{file}: tensor {key!r} is not in a model of this config.json (n_layer={cfg.n_layer})")
            else:
                expected_shape = expected[key]
            if shape != expected_shape:
                raise ValueError(f"{file}: tensor {key!r} has shape {shape} but config.json implies {expected_shape}")
            if key in seen:
                raise ValueError(f"{file}: tensor {key!r} is stored twice")
            seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is missing from the weights of {str(files[0].parent)!r} ({len(missing)} missing)")


def tensor_headers(file: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file, without reading the data."""
    try:
        with safe_open(file, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a torn or foreign file
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None


def our_target_or_error(key: str, file: Path) -> tuple[str, str | None] | None:
    try:
        return our_target(key)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None


@torch.no_grad()
def fill_weights(net: Llama, files: list[Path]) -> None:
    """Copy every tensor into `net`'s parameters (fp32 here, whatever the file holds)."""
    cfg, params = net.cfg, dict(net.named_parameters(remove_duplicate=False))
    rows = qkv_rows(cfg)
    tied_head = None
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                target = our_target(key)
                if target is None:
                    continue
                ours, part = target
                tensor = to_ours(f.get_tensor(key), part, cfg)
                if key == "lm_head.weight" and cfg.tie_embeddings:
                    tied_head = tensor
                    continue
                dest = params[ours]
                if part is not None:
                    start, end, _ = rows[part]
                    dest = dest[start:end]
                dest.copy_(tensor)
    if tied_head is not None and not torch.equal(tied_head.to(net.embed.weight.dtype), net.embed.weight):
        raise ValueError("tie_word_embeddings=true but the stored lm_head.weight differs from model.embed_tokens.weight")


def check_checkpoint(path: str | Path, seq_len: int | None = None, vocab_size: int | None = None) -> tuple[LlamaConfig, list[Path]]:
    """Every check of a checkpoint directory that reads no weights (config, files, tensor
    headers), and whether a run's sequence length and tokenizer fit it."""
    _, cfg = read_config(path)
    files = weight_files(path)
    check_tensors(files, cfg)
    if seq_len is not None and seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len={seq_len} exceeds the checkpoint's max_position_embeddings={cfg.max_seq_len}")
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer's vocab_size={vocab_size} exceeds the checkpoint's vocab_size={cfg.vocab_size}")
    return cfg, files


def load_hf_llama(path: str | Path, vocab_size: int | None = None) -> Llama:
    """Our plain Llama with the weights of the Hugging Face directory `path` (fp32, CPU, train
    mode like any new module). Every check runs before the first weight is read."""
    cfg, files = check_checkpoint(path, vocab_size=vocab_size)
    # Built without initialisation: check_tensors guarantees every parameter is overwritten.
    with torch.device("meta"):
        net = Llama(cfg)
    net.to_empty(device="cpu")
    if cfg.tie_embeddings:
        net.lm_head.weight = net.embed.weight  # to_empty may give the two their own storage
    net.rope_cache = torch.empty(0)
    fill_weights(net, files)
    return net
