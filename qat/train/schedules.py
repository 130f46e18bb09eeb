"""Learning-rate schedules as pure multiplier functions of the optimizer step.

Wrapped in LambdaLR by `lr_scheduler`; the functions are plain so they can be tested
and plotted without an optimizer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch


def _cosine_ramp(frac: float, start: float, end: float) -> float:
    """Cosine interpolation from start (frac=0) to end (frac=1)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def cosine_with_warmup(step: int, total_steps: int, warmup_fraction: float = 0.1, initial_div: float = 100.0, final_div: float = 10.0) -> float:
    """QuEST's schedule, torch's OneCycleLR step for step: cosine warm-up from lr/initial_div
    to lr, peaking at step warmup_fraction*total - 1, then cosine decay to lr/final_div at the
    last step (total - 1)."""
    peak = warmup_fraction * total_steps - 1
    if step <= peak:
        # A warm-up ending at step 0 (warmup_fraction * total == 1) has no length: step 0 is
        # its end, the peak (OneCycleLR divides by zero there).
        return _cosine_ramp(step / peak, 1.0 / initial_div, 1.0) if peak > 0 else 1.0
    return _cosine_ramp((step - peak) / max(total_steps - 1 - peak, 1e-9), 1.0, 1.0 / final_div)


def warmup_stable_decay(
    step: int, total_steps: int, warmup_fraction: float = 0.1, decay_fraction: float = 0.2, initial_div: float = 100.0, final_scale: float = 0.0
) -> float:
    """Linear warm-up from lr/initial_div, constant lr, then linear decay to lr*final_scale
    over the last decay_fraction of the steps."""
    warmup = max(1, round(warmup_fraction * total_steps))
    decay_start = total_steps - round(decay_fraction * total_steps)
    if step < warmup:
        return 1.0 / initial_div + (1.0 - 1.0 / initial_div) * step / warmup
    if step < decay_start:
        return 1.0
    return 1.0 + (final_scale - 1.0) * min(1.0, (step - decay_start) / max(1, total_steps - decay_start))


def constant(step: int, total_steps: int) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[..., float]] = {
    "cosine": cosine_with_warmup,
    "wsd": warmup_stable_decay,
    "constant": constant,
}


# Each schedule argument and the range it must lie in (fractions of the run, divisors > 0).
_UNIT = (0.0, 1.0)
_RANGES = {"warmup_fraction": _UNIT, "decay_fraction": _UNIT, "final_scale": _UNIT, "initial_div": (0.0, math.inf), "final_div": (0.0, math.inf)}


def check_schedule_args(name: str, kwargs: dict[str, float]) -> None:
    """One-line errors for a schedule name or argument out of range (before any training)."""
    if name not in SCHEDULES:
        raise ValueError(f"scheduler.name={name!r} is not allowed; choose one of {', '.join(SCHEDULES)}")
    for key, value in kwargs.items():
        low, high = _RANGES.get(key, (-math.inf, math.inf))
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not (low <= value <= high) or (low == 0.0 and high == math.inf and value <= 0):
            allowed = "a number > 0" if high == math.inf else f"a number in [{low:g}, {high:g}]"
            raise ValueError(f"scheduler.{key}={value!r} is not allowed; use {allowed}")
    if kwargs.get("warmup_fraction", 0.0) + kwargs.get("decay_fraction", 0.0) > 1.0:
        raise ValueError(f"scheduler.warmup_fraction + decay_fraction = {kwargs['warmup_fraction'] + kwargs['decay_fraction']:g} must be <= 1")


def lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, name: str = "cosine", **kwargs: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per optimizer step with SCHEDULES[name]."""
    check_schedule_args(name, kwargs)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1 (set trainer.max_steps)")
    fn = functools.partial(SCHEDULES[name], total_steps=total_steps, **kwargs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: fn(step))
