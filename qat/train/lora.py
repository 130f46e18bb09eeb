"""QAT with low-rank adapters (`lora=default`): the pretrained base is frozen, and each targeted
QuantLinear learns a LowRankDelta (qat/quant/low_rank.py) that its weight quantizer sees merged,
Q((W + (alpha / r) B A) H): what trains is what merging and export deploy.

    python train.py experiment=qat_finetune model.path=DIR data.path=corpus.jsonl lora=default
    python scripts/merge_lora.py --ckpt RUN/checkpoints/last.ckpt --out merged.ckpt

The lifecycle, in train.py's order: the base is built (model.path, then init_from's weights if
set) -> `add_adapters` attaches the adapters and freezes every other weight (embeddings, norms,
head and every block weight; LSQ / PACT scales still learn) -> compile / shard. A checkpoint
holds only `adapter_state` (the adapters and quantizer state) and `LORA_BASE`, the base's path
and content hash (qat/train/identity.py); loading it rebuilds the base, refuses another one by
name, and `merge_adapters` folds the adapters into the weights: an ordinary model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.quant.linear import QuantLinear
from qat.quant.low_rank import LowRankDelta
from qat.train.identity import check_same_model
from qat.train.lifecycle import plain_name, pretrained_path

METHODS = ("none", "lora")
LORA_BASE = "lora_base"  # the checkpoint entry: {"path", "sha256"} of the base the adapters change
# State-dict entries a LoRA checkpoint holds: the adapters, and every quantizer's state (an LSQ /
# PACT scale and its initialised flag). Everything else is the frozen base's.
ADAPTER_STATE = (".lora.", "_quantizer.")


@dataclass(frozen=True)
class LoraConfig:
    """The `lora` config group (configs/lora/*.yaml), validated once. Whether `rank` fits each
    target and each glob matches a layer is checked by `add_adapters` on the meta-device build."""

    name: str = "none"  # "none" (every weight trains) | "lora" (adapters on a frozen base)
    rank: int = 16
    alpha: float | None = None  # null: 2 * rank (a scale alpha / rank of 2 at any rank)
    dropout: float = 0.0  # drops whole rank components in training (qat/quant/low_rank.py)
    target: tuple[str, ...] = ("*",)  # globs over QuantLinear names; "*" is every block linear
    lr: float | None = None  # the run's peak LR, replacing optimizer.lr; null: optimizer.lr

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"lora.name={self.name!r} is not allowed; choose one of {', '.join(map(repr, METHODS))}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank={self.rank!r} must be an integer >= 1 (and at most min(in, out) of every targeted layer)")
        alpha = self.alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"lora.alpha={alpha!r} must be a number > 0, or null for 2 * rank")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"lora.dropout={dropout!r} must be a number in [0, 1)")
        target = (self.target,) if isinstance(self.target, str) else self.target
        if not isinstance(target, Sequence) or not target or not all(isinstance(t, str) and t for t in target):
            raise ValueError(f"lora.target={self.target!r} must be a glob or a non-empty list of globs over layer names, e.g. ['layers.*.attn.*']")
        object.__setattr__(self, "target", tuple(target))
        lr = self.lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
            raise ValueError(f"lora.lr={lr!r} must be a number > 0, or null for optimizer.lr")
        defaults = tuple(f.default for f in dataclasses.fields(self) if f.name != "name")
        if self.name == "none" and (self.rank, self.alpha, self.dropout, self.target, self.lr) != defaults:
            raise ValueError("lora.rank / alpha / dropout / target / lr are ignored with lora=none; add lora=default")

    @property
    def enabled(self) -> bool:
        return self.name == "lora"

    @property
    def resolved_alpha(self) -> float:
        return 2.0 * self.rank if self.alpha is None else float(self.alpha)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on B A."""
        return self.resolved_alpha / self.rank

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> LoraConfig:
        """From a config's `lora` section (a config from before adapters has none: none)."""
        values = dict(values or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"lora.{unknown[0]} is not a key; allowed: {', '.join(f'lora.{k}' for k in sorted(allowed))}")
        return cls(**values)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> LoraConfig:
        raw = cfg.get("lora")
        return cls.from_mapping(OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw)


def base_source(model: Mapping[str, Any], init_from: str | None) -> Path:
    """The weights a LoRA run adapts: init_from's checkpoint when set (e.g. scripts/ptq.py's),
    else model=hf's directory. A from-scratch model has nothing to adapt: one line."""
    from qat.hf.load import checkpoint_dir

    if init_from is not None:
        return Path(init_from).resolve()
    return checkpoint_dir(pretrained_path(model, "lora needs a pretrained base to adapt", "start from a checkpoint with init_from=CKPT"))


def _targets(net: nn.Module, cfg: LoraConfig) -> dict[str, QuantLinear]:
    """The QuantLinears the globs select, by plain name; one line for a glob matching none or a
    rank above a target's min(in, out)."""
    layers = {plain_name(n): m for n, m in net.named_modules() if isinstance(m, QuantLinear)}
    names = list(layers)
    for i, glob in enumerate(cfg.target):
        if not any(fnmatchcase(n, glob) for n in names):
            examples = ", ".join(names[:3]) + (f", ... ({len(names)} layers)" if len(names) > 3 else "")
            raise ValueError(f"lora.target[{i}]={glob!r} matches no quantized layer; the layers are {examples or 'none'}")
    chosen = {n: m for n, m in layers.items() if any(fnmatchcase(n, g) for g in cfg.target)}
    name, smallest = min(((n, min(m.in_features, m.out_features)) for n, m in chosen.items()), key=lambda t: t[1])
    if cfg.rank > smallest:
        raise ValueError(f"lora.rank={cfg.rank} is larger than min(in, out)={smallest} of layer {name}; allowed: 1 to {smallest} (or target fewer layers)")
    return chosen


def add_adapters(net: nn.Module, cfg: LoraConfig) -> list[str]:
    """Attach a LowRankDelta to every targeted QuantLinear (on its weight's device and dtype;
    A drawn from the torch RNG) and freeze everything but the adapters and quantizer scales.
    Returns the adapted layers' names. On the meta device: the checks alone, for free."""
    chosen = _targets(net, cfg)
    for layer in chosen.values():
        w = layer.weight
        layer.lora = LowRankDelta(layer.in_features, layer.out_features, cfg.rank, cfg.resolved_alpha, cfg.dropout, device=w.device, dtype=w.dtype)
    for name, param in net.named_parameters():
        param.requires_grad_(any(part in name for part in ADAPTER_STATE))
    return list(chosen)


def has_adapters(net: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) and m.lora is not None for m in net.modules())


def adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a state dict that a LoRA checkpoint stores (ADAPTER_STATE)."""
    return {k: v for k, v in state.items() if any(part in k for part in ADAPTER_STATE)}


@torch.no_grad()
def merge_adapters(net: nn.Module) -> list[str]:
    """W <- W + (alpha / r) B A in every adapted layer, by the very forward training ran (bit for
    bit the weight its quantizer saw), the adapters removed and every weight trainable again:
    the ordinary model of build_net. Returns the merged layers' names."""
    merged = []
    for name, layer in net.named_modules():
        if isinstance(layer, QuantLinear) and layer.lora is not None:
            layer.weight.copy_(layer.lora.eval()(layer.weight))
            layer.lora = None
            merged.append(plain_name(name))
    net.requires_grad_(True)
    return merged


def check_same_base(saved: Mapping[str, str] | None, now: Mapping[str, str], checkpoint: Path) -> None:
    """Adapters continue, merge or export only onto the base they were trained on."""
    check_same_model(
        saved, now,
        absent=f"{checkpoint} holds no LoRA adapters (a run without lora); resume=false (or another run_name=) starts a LoRA run",
        recorded=f"{checkpoint} adapts the base",
        remedy="give the base it was trained on, or resume=false (or another run_name=) for a new run",
    )  # fmt: skip


def lora_summary(net: nn.Module, cfg: LoraConfig, layers: Sequence[str], base: Mapping[str, str]) -> str:
    """One line for the start-up summary: what trains, of how much, on which base."""
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    return (
        f"lora: rank {cfg.rank}, alpha {cfg.resolved_alpha:g} (scale {cfg.scale:g}){f', lr {cfg.lr:g}' if cfg.lr is not None else ''} on {len(layers)} layers; "
        f"{trainable:,} of {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%), the base is frozen: "
        f"{base['path']} (sha256 {base['sha256'][:12]})"
    )
