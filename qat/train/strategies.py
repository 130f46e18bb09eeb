"""Distributed strategies that need Python objects (not expressible in YAML)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", **kwargs: Any) -> FSDPStrategy:
    """FSDP with one unit per transformer block (models.llama.Block), mixed precision from the Trainer."""
    from models.llama import Block

    return FSDPStrategy(sharding_strategy=sharding_strategy, auto_wrap_policy={Block}, **kwargs)
