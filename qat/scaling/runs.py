"""`Run`: one training run as the scaling-law tools see it (read from results.json or a table)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    """One training run. w_bits/a_bits are only needed by the kumar law (16 = bf16)."""

    N: float  # non-embedding parameters
    D: float  # training tokens
    precision: str  # key, e.g. "bf16", "w4a4", "w4a16", "fp4", "2:4", "w4a4-nohad"
    loss: float  # final validation loss (nats/token)
    w_bits: float | None = None
    a_bits: float | None = None
    size_label: str | None = None
    memory_bits: float | None = None  # bits stored per weight (precision.storage_bits), from the stored fields
