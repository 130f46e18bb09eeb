"""Checkpoint files: written atomically, found for resume, and turned back into the model.

Checkpoints hold plain containers only (loadable with torch.load(weights_only=True)): the
resolved run config, the quantization metadata, and the LightningModule state dict. A model
is rebuilt from them by the same `build_net` that train.py uses. A LoRA run's checkpoint holds
its adapters and quantizer state only, and its base's identity (`LORA_BASE`): the base is read
from where it lay, checked by content, and the adapters merged in (qat/train/lora.py).
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
from qat.quant.config import QuantizerConfig
from qat.train.identity import model_identity
from qat.train.lifecycle import build_net, quantization_metadata
from qat.train.lora import LORA_BASE, LoraConfig, add_adapters, adapter_state, check_same_base, has_adapters, merge_adapters

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
NET_PREFIX = "net."  # the LightningModule holds the model as `net`


class LoadedModel(NamedTuple):
    net: nn.Module
    tokenizer: Any
    config: dict
    step: int


def checkpoint_file(path: str | Path, key: str = "checkpoint") -> Path:
    """`path` if it is a file; else one line saying what it is (absent, a run directory, a
    packed export or Hugging Face directory) and what a checkpoint is. `key` names the input."""
    path = Path(path)
    if path.is_file():
        return path
    expected = "give a checkpoint file of train.py (RUN/checkpoints/last.ckpt)"
    if (path / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
        raise ValueError(f"{key} {str(path)!r} is a run directory; give its {CHECKPOINT_DIR}/{LAST_CHECKPOINT}")
    if path.is_dir():
        kind = "a model directory (a packed export or a Hugging Face model)" if (path / "config.json").is_file() else "a directory"
        raise ValueError(f"{key} {str(path)!r} is {kind}, not a checkpoint; {expected}")
    raise ValueError(f"{key} {str(path)!r} does not exist; {expected}")


def load_trained(path: str | Path, device: str | torch.device = "cpu", merge: bool = True) -> LoadedModel:
    """The model of a train.py checkpoint, quantized as it was trained, in eval mode. A LoRA
    checkpoint's model is its base with the adapters merged into the weights, and its config
    says lora=none: an ordinary model that every exporter reads (merge=False keeps the adapters:
    training's own forward)."""
    path = checkpoint_file(path)
    ckpt = read_checkpoint(path)
    if "config" not in ckpt or "quantization" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} was not written by train.py (no config/quantization entries)")
    cfg = ckpt["config"]
    base = ckpt.get(LORA_BASE)
    if base is not None:  # checked before the (slow) build: a missing or changed base fails first
        cfg = _base_config(path, cfg, base)
    tokenizer = instantiate(OmegaConf.create(cfg["tokenizer"]))
    net = build_net(cfg, tokenizer.vocab_size)
    check_same_quantization(path, ckpt["quantization"], quantization_metadata(net))
    state = {k[len(NET_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(NET_PREFIX)}
    if base is None:
        net.load_state_dict(state)
    else:
        _load_adapters(path, net, cfg, state)
        if merge:
            merge_adapters(net)
            cfg = {**cfg, "lora": {"name": "none"}}
    return LoadedModel(net.to(device).eval(), tokenizer, cfg, int(ckpt["global_step"]))


def _base_config(path: Path, cfg: dict[str, Any], base: dict[str, str]) -> dict[str, Any]:
    """The run config that rebuilds a LoRA checkpoint's base from the path its identity records
    (resolved at training time), after checking that path still holds the same weights."""
    source = Path(base["path"])
    if not source.exists():
        raise ValueError(f"checkpoint {str(path)!r} holds LoRA adapters of the base {source} (sha256 {base['sha256'][:12]}), which does not exist; put that base back")
    check_same_base(base, model_identity(source), path)
    if cfg.get("init_from"):
        return {**cfg, "init_from": str(source)}
    return {**cfg, "model": {**cfg["model"], "path": str(source)}}


def _load_adapters(path: Path, net: nn.Module, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The base's weights (init_from's, when the run started from a checkpoint), then the
    adapters and quantizer state of the checkpoint; every adapter must be there."""
    if cfg.get("init_from"):
        load_initial_weights(net, cfg["init_from"])
    add_adapters(net, LoraConfig.from_mapping(cfg.get("lora")))
    expected, saved = adapter_state(net.state_dict()), adapter_state(state)
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {missing[0]} ({len(missing)} adapter entries missing): its lora config does not match its adapters")
    net.load_state_dict(saved, strict=False)


def write_model_checkpoint(path: str | Path, net: nn.Module, config: dict[str, Any], step: int = 0, **extra: Any) -> Path:
    """A checkpoint of `net` that load_trained, the exporters and `init_from=` read like one
    train.py wrote (no optimizer state: a run started from it begins at step 0). A net with
    adapters is stored as train.py stores it: adapters and quantizer state, and `lora_base`
    (its identity) in `extra`. Atomic."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if has_adapters(net):
        if LORA_BASE not in extra:
            raise ValueError(f"a model with LoRA adapters needs its base's identity ({LORA_BASE}=model_identity(base)) to be saved")
        state = adapter_state(state)
    ckpt = {
        "config": config,
        "quantization": quantization_metadata(net),
        "state_dict": {NET_PREFIX + k: v for k, v in state.items()},
        "global_step": step,
        **extra,
    }
    return atomic_write(path, lambda f: torch.save(ckpt, f))


def merge_lora_checkpoint(ckpt: str | Path, out: str | Path, force: bool = False) -> Path:
    """scripts/merge_lora.py: a LoRA checkpoint as an ordinary one, weights W + (alpha / r) B A
    and the quantizer configs unchanged (what `merged_from` says it came from). Atomic."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give the checkpoint file to write")
    if out.exists() and not force:
        raise ValueError(f"--out {str(out)!r} exists; add --force to replace it")
    path = checkpoint_file(ckpt, key="--ckpt")
    saved = read_checkpoint(path)
    if LORA_BASE not in saved:
        raise ValueError(f"--ckpt {str(path)!r} holds no LoRA adapters (a run without lora=...): it is an ordinary checkpoint already, which every exporter reads as is")
    model = load_trained(path)
    merged_from = {"checkpoint": str(path.resolve()), "step": model.step, LORA_BASE: saved[LORA_BASE], "lora": saved["config"].get("lora")}
    return write_model_checkpoint(out, model.net, model.config, model.step, merged_from=merged_from)


def load_initial_weights(net: nn.Module, path: str | Path) -> dict[str, Any]:
    """Start a run from another checkpoint's weights (`init_from=`): every weight of the plain
    model must be there with its shape; quantizer state (a learned scale) is taken where the
    checkpoint has it with the same shape. Returns what to record: the file, its step and, for
    a post-training checkpoint (scripts/ptq.py), its method."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"init_from={str(path)!r} does not exist (expected a checkpoint of train.py or scripts/ptq.py)")
    ckpt = read_checkpoint(path)
    if LORA_BASE in ckpt:
        raise ValueError(f"init_from={str(path)!r} holds LoRA adapters only; merge them into their base first (scripts/merge_lora.py) and start from that")
    saved = {k[len(NET_PREFIX) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(NET_PREFIX)}
    own = net.state_dict()
    quantizer_state = ("_quantizer.", "rope_cache")
    for key, value in own.items():
        if key not in saved:
            if any(q in key for q in quantizer_state):
                continue
            raise ValueError(f"init_from={str(path)!r} has no {key}: it is a checkpoint of another model")
        if saved[key].shape != value.shape:
            raise ValueError(f"init_from={str(path)!r}: {key} has shape {tuple(saved[key].shape)}, the model {tuple(value.shape)}")
    net.load_state_dict({k: saved[k] for k in own if k in saved}, strict=False)
    return {"path": str(path.resolve()), "step": int(ckpt["global_step"]), "ptq": ckpt.get("ptq", {}).get("method")}


def saved_layer_configs(quant: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """checkpoint["quantization"]["layers"] as {name: {"weight", "activation"}}. Checkpoints
    from before per-layer rules hold a list of names, every layer at the top-level configs."""
    layers = quant["layers"]
    if isinstance(layers, dict):
        return layers
    return {name: {"weight": quant["weight"], "activation": quant["activation"]} for name in layers}


def check_same_quantization(path: Path, saved: dict[str, Any], rebuilt: dict[str, Any]) -> None:
    """The rebuilt model quantizes the same layers with the same configs as the checkpoint
    (a checkpoint from before per-layer rules: the same layer names)."""
    before, now = saved_layer_configs(saved), rebuilt["layers"]
    if list(before) != list(now):
        missing = sorted(set(before) ^ set(now))
        raise ValueError(f"checkpoint {str(path)!r} quantized {len(before)} layers but the model now has {len(now)} (differing: {', '.join(missing[:3]) or 'order'})")
    if not isinstance(saved["layers"], dict):
        return
    for name, configs in now.items():
        try:  # through the schema: a field added since takes its default on both sides
            same = all(QuantizerConfig.from_mapping(before[name][s]) == QuantizerConfig.from_mapping(configs[s]) for s in ("weight", "activation"))
        except (KeyError, TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(f"checkpoint {str(path)!r}: layer {name} was trained with other quantizer configs than its config now resolves to")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temp file, then rename: a killed job never leaves a torn last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def candidate_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint a run may resume from: last.ckpt, the step checkpoints, and
    Lightning's SLURM requeue checkpoints (hpc_ckpt_<n>.ckpt, written in the run dir)."""
    folder = run_dir / CHECKPOINT_DIR
    found = [p for p in folder.glob("*.ckpt") if p.is_file()] if folder.is_dir() else []
    return found + [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.is_file()]


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Temp files of writes that a killed job never finished (atomic_write's .<name>.*.tmp)."""
    stale = [p for folder in (run_dir, run_dir / CHECKPOINT_DIR) if folder.is_dir() for p in folder.glob(".*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True), with any failure as one ValueError naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, random bytes, text, pickles of code: all unreadable here
        raise ValueError(f"checkpoint {str(path)!r} is unreadable: truncated, corrupt or not a torch checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no global_step)")
    return ckpt


def newest_checkpoint(run_dir: Path, warn: Any = print) -> tuple[Path, dict[str, Any]] | None:
    """The loadable checkpoint with the highest step (newest file on a tie); a corrupt one is
    reported in one line and skipped, so a run falls back to the one before it."""
    ranked = []
    for path in candidate_checkpoints(run_dir):
        try:
            ckpt = read_checkpoint(path)
        except ValueError as err:
            warn(f"warning: {err}; skipping it")
            continue
        ranked.append((int(ckpt["global_step"]), path.stat().st_mtime, path, ckpt))
    if not ranked:
        return None
    _, _, path, ckpt = max(ranked, key=lambda r: (r[0], r[1]))
    return path, ckpt


# The parts of a run config that decide what the weights mean; resuming across a change
# in any of them would silently train a different model.
IDENTITY_SECTIONS = ("model", "quant", "tokenizer", "data", "distill", "lora")
# Where, how fast, how much validation; a teacher is identified by its content hash, not its path.
NOT_IDENTITY = ("data.cache_dir", "data.num_workers", "data.val_batches", "distill.teacher")
# Keys added since older checkpoints were written, with the value their absence meant.
ADDED_KEYS = {"quant.rules": [], "distill.name": "none", "distill.temperature": 1.0, "distill.ce_weight": 0.0, "distill.teacher_dtype": "float32", "lora.name": "none"}


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys under IDENTITY_SECTIONS whose values differ between two resolved run configs."""
    a = {k: v for s in IDENTITY_SECTIONS for k, v in _flatten(saved.get(s), s).items()}
    b = {k: v for s in IDENTITY_SECTIONS for k, v in _flatten(current.get(s), s).items()}
    return sorted(k for k in a.keys() | b.keys() if a.get(k, ADDED_KEYS.get(k)) != b.get(k, ADDED_KEYS.get(k)) and k not in NOT_IDENTITY)
