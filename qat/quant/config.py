"""`QuantizerConfig`: the typed schema of one fake quantizer.

A quantizer is a composition: rotation -> scale fit -> grid rounding, with a gradient
estimator for the backward pass (and optional 2:4 sparsity). Every field picks one small
function; nothing here is a code path of its own. Hydra YAML holds the values
(`configs/quant/*.yaml`); this dataclass validates them so that an impossible
combination fails at construction, naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qat.quant.bits import NO_QUANT_BITS, parse_bits
from qat.quant.estimators import ESTIMATORS
from qat.quant.grids import GRIDS, Grid, grid_bits_error
from qat.quant.hadamard_orders import has_construction
from qat.quant.scales import SCALE_FITS

# The allowed names come from the registries, so a new registered function is a new choice.
# "lsq" is the learnable scale, a parameter of the quantizer rather than a fit function.
LEARNABLE_SCALE = "lsq"
ROTATIONS = ("none", "hadamard")
SPARSITIES = ("none", "2:4")
BACKENDS = ("auto", "torch", "triton")
SCALE_DTYPES = ("float32", "float16")
# When a weight's scale is fitted: "refit" in every forward; "frozen" once (at the first forward,
# or by GPTQ), then stored with the weight; "learned" stored and trained (LSQ's step gradient).
SCALE_UPDATES = ("refit", "frozen", "learned")
# Estimators whose backward trains the scale; they need a learnable scale and vice versa.
LEARNABLE_SCALE_ESTIMATORS = ("lsq", "pact")
# An offset grid (asymmetric=true): the fits that place a centre, the estimators that need no scale gradient.
ASYMMETRIC_SCALES = ("rms_mse", "absmax")
ASYMMETRIC_ESTIMATORS = ("trust", "ste", "clip")
DEFAULT_HADAMARD_BLOCK = 128
DEFAULT_CLIP_SCALE = 1.0


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


@dataclass
class QuantizerConfig:
    """One fake quantizer. The defaults are QuEST's 4-bit quantizer.

    bits: 1..8, 1.58 (ternary {-s, 0, s}) or 16 (no quantization; the rotation, if any,
        still applies, so a 16-bit Hadamard layer is an exact reparametrisation).
    rotation: "none" | "hadamard" (block Hadamard rotation along the last dim).
    hadamard_block: an int >= 2 with a Hadamard construction, or "full" (the whole last dim,
        which then needs one). Constructed: powers of two (Sylvester, the fast butterfly) and
        m * 2^k with m a Paley order (q + 1 or 2(q + 1), q a prime power) or a product of
        those: 576, 1536, 11008, 14336 all work (qat/quant/hadamard_orders.py).
    scale: "rms_mse" (c(bits)*RMS, MSE-optimal for a Gaussian) | "absmax" | "mse_search"
        (per-row search of the clip ratio minimising the actual squared error) | "lsq"
        (one learnable scale per tensor, initialised to c(bits)*RMS on the first batch).
    grid: "int" (QuEST: n uniform levels spanning [-s, s], no zero for even n) | "int_zero"
        (symmetric with a zero level, 2*floor((n-1)/2)+1 levels) | "gaussian" (Lloyd-Max
        levels of N(0,1)) | "fp4" (e2m1 values; bits must be 4).
    estimator: "trust" | "ste" | "clip" | "lsq" | "pact".
    trust: trust radius in RMS units; None = half the outermost grid step at the scale in use
        (QuEST's default; at the rms_mse scale c * RMS that is grid.default_trust RMS units).
    clip_scale: the clip estimator passes gradients where |x| <= clip_scale * s.
    granularity: "row" (one scale per row of the last dim) or a group size dividing it.
    sparsity: "none" | "2:4" (keep the 2 largest magnitudes of every 4, after the rotation).
    backend: "auto" (Triton on CUDA when the combination is supported) | "torch" | "triton".
    scale_dtype: "float32" | "float16": the grid's unit step (s / center on a uniform grid, s on
        a level grid) rounded to float16 in every forward, so that each value is an exact
        float16 step times an integer: what GGUF's Q4_0 / Q8_0 blocks store (quant=gguf_q4_0).
    asymmetric: levels c * d + m for c = 0 .. n-1 with a per-row (group) offset m, on the
        "int" grid (n = 2^bits levels): what GGUF's Q4_1 stores (quant=gguf_q4_1). The scale
        fit places them: "rms_mse" centres them on the group mean with half-range c(bits) times
        the centred RMS, "absmax" spans the group's [min, max] (llama.cpp's own Q4_1 rule).
        With scale_dtype float16 both d and m are float16 numbers.
    scale_update: "refit" (the fit above runs in every forward) | "frozen" (it runs once, on the
        first forward or in GPTQ, and the per-row / per-group scale is stored with the weight, so a
        PTQ checkpoint's scales and codes survive into training and export) | "learned" (stored,
        then trained with LSQ's step gradient: range learning, initialised from the fit). Weights
        only: a QuantLinear refuses it on its input quantizer.
    """

    bits: int | float = 4
    rotation: str = "hadamard"
    hadamard_block: int | str = DEFAULT_HADAMARD_BLOCK
    scale: str = "rms_mse"
    grid: str = "int"
    estimator: str = "trust"
    trust: float | None = None
    clip_scale: float = DEFAULT_CLIP_SCALE
    granularity: int | str = "row"
    sparsity: str = "none"
    backend: str = "auto"
    scale_dtype: str = "float32"
    asymmetric: bool = False
    scale_update: str = "refit"

    def __post_init__(self) -> None:
        self.bits = parse_bits(self.bits)
        _choice("rotation", self.rotation, ROTATIONS)
        _choice("scale", self.scale, (*SCALE_FITS, LEARNABLE_SCALE))
        _choice("grid", self.grid, tuple(GRIDS))
        _choice("estimator", self.estimator, tuple(ESTIMATORS))
        _choice("sparsity", self.sparsity, SPARSITIES)
        _choice("backend", self.backend, BACKENDS)
        _choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        _choice("scale_update", self.scale_update, SCALE_UPDATES)
        if not isinstance(self.asymmetric, bool):
            raise ValueError(f"asymmetric={self.asymmetric!r} is not allowed; use true or false")
        block = self.hadamard_block
        if block != "full" and (isinstance(block, bool) or not isinstance(block, int) or block < 2 or not has_construction(block)):
            raise ValueError(
                f"hadamard_block={block!r} is not allowed; use 'full' or an int >= 2 with a Hadamard construction: "
                "m * 2^k with m = 1 or a Paley order (q + 1 for a prime power q = 3 mod 4, 2(q + 1) for q = 1 mod 4) or a product of those"
            )
        gran = self.granularity
        if gran != "row" and (isinstance(gran, bool) or not isinstance(gran, int) or gran < 1):
            raise ValueError(f"granularity={gran!r} is not allowed; use 'row' or a positive group size")
        if self.trust is not None and not (isinstance(self.trust, (int, float)) and self.trust > 0):
            raise ValueError(f"trust={self.trust!r} is not allowed; use a positive float or None (half a grid step)")
        if not (isinstance(self.clip_scale, (int, float)) and self.clip_scale > 0):
            raise ValueError(f"clip_scale={self.clip_scale!r} is not allowed; use a positive float")
        self._reject_ignored_fields()
        if not self.enabled:
            return
        if why := grid_bits_error(self.grid, self.bits):
            raise ValueError(why)
        learnable = self.scale == LEARNABLE_SCALE
        if self.estimator in LEARNABLE_SCALE_ESTIMATORS and not learnable:
            raise ValueError(f"estimator={self.estimator!r} trains the scale; it needs scale='lsq', got scale={self.scale!r}")
        if learnable and self.estimator not in LEARNABLE_SCALE_ESTIMATORS:
            raise ValueError(
                f"scale='lsq' is learnable but estimator={self.estimator!r} gives it no gradient; use estimator 'lsq' or 'pact'"
            )
        if learnable and self.scale_dtype != "float32":
            raise ValueError(f"scale_dtype={self.scale_dtype!r} is not allowed with scale='lsq' (a learned scale is not rounded); use 'float32'")
        if self.asymmetric:
            self._check_asymmetric_choices()
        if self.holds_scale:
            self._check_held_scale_choices()
        if learnable and gran != "row":
            raise ValueError(f"granularity={gran!r} is not allowed with scale='lsq' (one learnable scale per tensor); use 'row'")

    def _check_asymmetric_choices(self) -> None:
        for field, value, allowed in (("grid", self.grid, ("int",)), ("scale", self.scale, ASYMMETRIC_SCALES),
                                      ("estimator", self.estimator, ASYMMETRIC_ESTIMATORS), ("sparsity", self.sparsity, ("none",))):
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not allowed with asymmetric=true; choose one of {', '.join(map(repr, allowed))}")

    def _check_held_scale_choices(self) -> None:
        if self.scale == LEARNABLE_SCALE:
            raise ValueError(f"scale_update={self.scale_update!r} is not allowed with scale='lsq' (one learned scale per tensor already); use a fit: {', '.join(map(repr, SCALE_FITS))}")
        if self.asymmetric:
            raise ValueError(f"scale_update={self.scale_update!r} is not allowed with asymmetric=true (a stored offset is not supported); use scale_update='refit'")

    def _reject_ignored_fields(self) -> None:
        """One rule: a field that only one choice reads must keep its default under any other
        choice, so that no value is accepted and silently ignored."""
        if self.hadamard_block != DEFAULT_HADAMARD_BLOCK and self.rotation != "hadamard":
            raise ValueError(f"hadamard_block={self.hadamard_block!r} is ignored with rotation={self.rotation!r}; set rotation='hadamard' or leave it at {DEFAULT_HADAMARD_BLOCK}")
        if not self.enabled:
            return  # 16 bits: no estimator runs, so its knobs are moot (presets share them)
        if self.trust is not None and self.estimator != "trust":
            raise ValueError(f"trust={self.trust!r} is ignored with estimator={self.estimator!r}; use estimator='trust' or trust=null")
        if self.clip_scale != DEFAULT_CLIP_SCALE and self.estimator != "clip":
            raise ValueError(f"clip_scale={self.clip_scale!r} is ignored with estimator={self.estimator!r}; use estimator='clip' or leave it at {DEFAULT_CLIP_SCALE}")

    @property
    def enabled(self) -> bool:
        """False for bits=16: values pass unquantized (after the rotation, if any)."""
        return self.bits != NO_QUANT_BITS

    @property
    def learnable_scale(self) -> bool:
        return self.enabled and self.scale == "lsq"

    @property
    def holds_scale(self) -> bool:
        """A per-row / per-group scale stored with the weight (scale_update frozen or learned)."""
        return self.enabled and self.scale_update != "refit"

    def trust_radius(self, grid: Grid) -> float:
        """The trust radius in RMS units (`trust`, or half the outermost grid step)."""
        return self.trust if self.trust is not None else grid.default_trust

    def block_for(self, dim: int) -> int:
        """The Hadamard block for a last dim of size `dim` ('full' resolved)."""
        return dim if self.hadamard_block == "full" else int(self.hadamard_block)

    def to_dict(self) -> dict[str, Any]:
        """Plain container (checkpoints load with torch.load(weights_only=True))."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | QuantizerConfig | None) -> QuantizerConfig:
        """Build from a dict / DictConfig, rejecting unknown keys by name."""
        if values is None:
            return cls(bits=NO_QUANT_BITS, rotation="none")
        if isinstance(values, cls):
            return values
        known = {f.name for f in dataclasses.fields(cls)}
        values = dict(values)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown quantizer field {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        return cls(**values)
