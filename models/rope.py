"""Rotary position embedding (RoPE) on INTERLEAVED pairs, and Llama 3's frequency scaling.

We rotate the pairs (x[2i], x[2i+1]) of a head; Hugging Face's Llama rotates the halves
(x[i], x[i + hd/2]). Both give the same attention once the q and k weight rows are permuted
per head (qat/hf/convert.py does that on import and export); the rotation angles are the same.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE scaling (Hugging Face `rope_type: llama3`).

    Frequencies whose wavelength exceeds original_max_seq_len / low_freq_factor are divided
    by `factor`; those shorter than original_max_seq_len / high_freq_factor are kept; the
    band between is blended linearly in original_max_seq_len / wavelength. Nothing else
    changes (no attention temperature), so a longer context reuses the trained frequencies.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"rope_scaling.{name}={value!r}: must be a positive number")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor!r} must exceed "
                f"low_freq_factor={self.low_freq_factor!r} (the blended band lies between them)"
            )
        n = self.original_max_seq_len
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"rope_scaling.original_max_seq_len={n!r}: must be a positive int")

    @classmethod
    def from_mapping(cls, values: "Mapping | RopeScaling | None") -> "RopeScaling | None":
        """From a dict (a Hydra override or a checkpoint), naming any unknown key."""
        if values is None or isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise ValueError(f"rope_scaling={values!r}: must be a mapping of {', '.join(f.name for f in fields(cls))}, or None")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        missing = [k for k in allowed if k not in values]
        if unknown or missing:
            raise ValueError(f"rope_scaling keys {sorted(values)}: allowed and required are exactly {', '.join(allowed)}")
        return cls(**values)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, float64; Llama-3-scaled if asked."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    s = scaling
    wavelength = 2 * math.pi / inv_freq
    slow = wavelength > s.original_max_seq_len / s.low_freq_factor  # longer than the old context
    fast = wavelength < s.original_max_seq_len / s.high_freq_factor  # many turns within it
    smooth = (s.original_max_seq_len / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return torch.where(slow, inv_freq / s.factor, torch.where(fast, inv_freq, blended))


def rope_table(
    seq_len: int, head_dim: int, theta: float, device: torch.device, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """cos/sin of the rotation angles: [seq_len, head_dim/2, 2] (last dim = (cos, sin)), fp32.

    Pair i of a head (dims 2i, 2i+1) turns by angle t * inv_freq[i] at position t.
    Angles are formed in float64 on the CPU and only then cast: at t ~ 2000 an fp32
    angle is off by ~1e-4 rad. The table is tiny and built once per length and device.
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # [T, hd/2]
    table = torch.stack((angles.cos(), angles.sin()), dim=-1)  # [T, hd/2, 2]
    return table.to(device=device, dtype=torch.float32)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x: [B, T, H, hd] by table: [T, hd/2, 2].

    Equivalent to multiplying the complex number x[2i] + j*x[2i+1] by exp(j * angle).
    Done in fp32 (fp64 for fp64 inputs) and cast back to x's dtype.
    """
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))  # [B, T, H, hd/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]  # [B, T, H, hd/2]
    cos = table[:, None, :, 0]  # [T, 1, hd/2], broadcasts over batch and heads
    sin = table[:, None, :, 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)  # [B, T, H, hd]
