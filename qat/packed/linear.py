"""`PackedLinear`: a trained quantized linear layer that holds its weight as packed codes.

This is the pure-PyTorch CPU reference of the packed format (format.py): its buffers are
the file's tensors under the file's names, and its forward computes what the fake-quantized
training layer computed. The input is rotated and quantized online by the same
`fake_quantize` training used (with the exported learned scale, if any); then one of two
paths runs, chosen once per layer by `forward_path`:

- "integer": both sides on a uniform grid (int / int_zero), dense. Codes become int8
  integers (format.integer_form), their products are summed exactly (int64) per scale
  group, and the two scales are applied once per output (and group). A faster backend
  (int8 MMA with int32 accumulation) computes the same integers.
- "dequantize": anything else (gaussian / fp4 grids, a 16-bit side, 2:4 sparsity). The
  weight is decoded to the very values training used and a float matmul runs, so the
  output is the training layer's, operation for operation.

Backends (`layer_backend`, decided once when a model is loaded): "torch" runs the above (the
specification every other backend is tested against); "cpu" (what "auto" takes on the CPU)
runs torch's int4 weight-packed matmul on the codes ("cpu-int4", qat/packed/cpu_int4.py: 1 to 4
bits on a uniform grid) after the same activation quantization, and otherwise the dequantize
computation with the decoded weight kept after the first call ("cpu-dequantize"): float math
on the same values, so its outputs are the reference's up to float32 summation order;
"triton" runs both paths as the fused kernels of `kernels` ("triton-integer": the input's
rotation + quantization in one kernel, then an int8 tensor-core GEMM on the packed codes;
"triton-dequantize": the packed weight decoded in registers inside a float GEMM), and fails
at load where they cannot; "auto" takes Triton on CUDA (torch for a layer it cannot run) and
torch elsewhere. A 16-bit weight has nothing to decode: F.linear on every backend.

Exactness: the integer path is the layer's exact output (only the scale products round);
training's float matmul differs from it by summation error (~K * eps relative). So the two
round an activation differently only where a value sits within that error of a rounding
boundary: rare near-ties in float32 (more likely at 8 bits, whose steps are fine), and exact
ties where an integer dot product is exactly 0 and the next layer quantizes it, unrotated, on
the "int" grid (whose even number of levels puts a boundary at 0). The packed model then
follows the rounding rule (ties up); the training forward's pick was float noise.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from qat.kernels.lowbit_ops import IntForm, lowbit_dequant_matmul, lowbit_int_matmul
from qat.kernels.lowbit_plan import lowbit_unsupported_reason
from qat.kernels.plan import interpreting
from qat.packed.format import (
    INPUT_LEVELS,
    INPUT_SCALE,
    POSITION_BITS,
    WEIGHT_CODES,
    WEIGHT_LEVELS,
    WEIGHT_POSITIONS,
    WEIGHT_SCALE,
    IntegerForm,
    dequantize,
    integer_form,
    merge_two_of_four,
    scale_groups,
    stored_codes_per_row,
    to_int8,
)
from qat.packed.cpu_int4 import Int4Weight, int4_linear, int4_unsupported_reason, pack_int4
from qat.packed.packing import packed_bytes, unpack_codes
from qat.quant.config import DEFAULT_CLIP_SCALE, QuantizerConfig
from qat.quant.fused import fused_fake_quantize, fused_unsupported_reason
from qat.quant.grids import make_grid
from qat.quant.quantizer import fake_quantize, quantizer_grid

BACKENDS = ("auto", "torch", "triton", "cpu")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {', '.join(map(repr, BACKENDS))}")


def layer_backend(backend: str, device: torch.device | str) -> str:
    """The backend a model loaded on `device` gives its layers, decided once, at load: "auto"
    is Triton on CUDA, the fast CPU path on the CPU and torch elsewhere (the interpreter is for
    tests, asked for explicitly); "triton" needs CUDA, or the CPU with TRITON_INTERPRET=1;
    "cpu" the CPU. Returns "torch", "cpu", "triton" (every packed layer must run on the
    kernels) or "auto" (those that can)."""
    _check_backend(backend)
    device = torch.device(device)
    if backend == "triton" and not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        raise ValueError(f"backend='triton' cannot run on device {device}: it needs CUDA, or the CPU with TRITON_INTERPRET=1")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' cannot run on device {device}; use 'auto' or 'torch'")
    if backend == "auto" and device.type != "cuda":
        return "cpu" if device.type == "cpu" else "torch"
    return backend


def forward_path(weight: QuantizerConfig, activation: QuantizerConfig, backend: str = "torch", kernel_reason: str | None = None) -> str:
    """Which computation a layer runs: "integer" or "dequantize" (module docstring), or with a
    "triton" / "auto" layer backend their kernels "triton-integer" / "triton-dequantize".
    kernel_reason: why the kernels cannot run this layer (None: they can).

    The one place that decides; a new backend adds its cases here.
    """
    _check_backend(backend)
    exact = all(c.enabled and c.sparsity == "none" and make_grid(c.bits, c.grid).uniform for c in (weight, activation))
    path = "integer" if exact else "dequantize"
    if backend == "cpu":
        return "cpu-int4" if kernel_reason is None else "cpu-dequantize"
    if backend == "torch" or not weight.enabled:
        return path
    if kernel_reason is None:
        return f"triton-{path}"
    if backend == "triton":
        raise ValueError(f"backend='triton' does not support {kernel_reason}; use backend='auto' or 'torch'")
    return path


def _per_group(scale: torch.Tensor, groups: int) -> torch.Tensor:
    """Scales [R, G0] repeated to [R, groups] (groups is a multiple of G0), in float64."""
    return scale.double().repeat_interleave(groups // scale.shape[-1], dim=-1)


def integer_matmul(
    a: torch.Tensor, a_form: IntegerForm, a_scale: torch.Tensor, w: torch.Tensor, w_form: IntegerForm, w_scale: torch.Tensor
) -> torch.Tensor:
    """int8 a [M, K] x int8 w [N, K] -> float64 [M, N]: sum_k q_a q_w (s_a/d_a)(s_w/d_w).

    q = mul * u + offset per side (format.IntegerForm). Expanding the product keeps the big
    sum on the int8 u's alone: sum q_a q_w = ma mw sum u_a u_w + ma ow sum u_a + oa mw sum u_w
    + oa ow g, i.e. an int8 matmul plus row-sum corrections. Sums are exact (int64); a group
    is the finer of the two sides' scale groups (g = gcd of their sizes), and each group's
    integer sum meets its scales once. a_scale [M, Ga], w_scale [N, Gw].
    """
    k = a.shape[-1]
    group = math.gcd(k // a_scale.shape[-1], k // w_scale.shape[-1])
    # torch has integer matmuls on the CPU only. Elsewhere float64 is just as exact: every
    # partial sum is an integer below 2**53 (|u| <= 128, so K up to 2**38), whatever the order.
    acc_dtype = torch.int64 if a.device.type == "cpu" else torch.float64
    au = a.to(acc_dtype).unflatten(-1, (-1, group))  # [M, G, g]
    wu = w.to(acc_dtype).unflatten(-1, (-1, group))  # [N, G, g]
    acc = torch.einsum("mgk,ngk->mng", au, wu) * (a_form.mul * w_form.mul)  # [M, N, G]
    if a_form.mul * w_form.offset:
        acc += a_form.mul * w_form.offset * au.sum(-1)[:, None, :]
    if a_form.offset * w_form.mul:
        acc += a_form.offset * w_form.mul * wu.sum(-1)[None, :, :]
    acc += a_form.offset * w_form.offset * group
    groups = k // group
    unit_a = _per_group(a_scale, groups) / a_form.divisor  # [M, G]
    unit_w = _per_group(w_scale, groups) / w_form.divisor  # [N, G]
    # |acc| < 2**53, so its float64 value is exact; the epilogue rounds only the scales.
    return (acc.double() * unit_a[:, None, :] * unit_w[None, :, :]).sum(-1)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"weight_dtype={name!r} is not allowed; use a floating torch dtype name such as 'float32'")
    return dtype


class PackedLinear(nn.Module):
    """y = quantize(x H) W_rot^T + b with W_rot stored as packed codes and scales.

    Built empty (on any device, "meta" included) with the shapes the format prescribes;
    `load_state_dict(..., assign=True)` then puts the file's tensors in, and `check()`
    validates them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_cfg: QuantizerConfig,
        activation_cfg: QuantizerConfig,
        bias: bool = False,
        weight_dtype: str = "float32",
        backend: str = "torch",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_cfg, self.activation_cfg = weight_cfg, activation_cfg
        self.weight_grid, self.input_grid = quantizer_grid(weight_cfg), quantizer_grid(activation_cfg)
        self.weight_dtype = _dtype(weight_dtype)
        if backend == "cpu":
            why = int4_unsupported_reason(weight_cfg, self.weight_grid, out_features, in_features, scale_groups(in_features, weight_cfg), self.weight_dtype)
        else:
            why = self._kernel_reason() if backend != "torch" and weight_cfg.enabled else None
        self.path = forward_path(weight_cfg, activation_cfg, backend, why)
        self._cpu_weight: Int4Weight | torch.Tensor | None = None  # built on the first cpu-* call
        self.fused_input = self._fused_input_cfg() if self.path.startswith("triton-") else None
        n, k = out_features, in_features
        packed = weight_cfg.enabled
        sparse = packed and weight_cfg.sparsity == "2:4"
        weight_levels = packed and not self.weight_grid.uniform
        input_levels = activation_cfg.enabled and not self.input_grid.uniform

        def empty(wanted: bool, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            # The format's shapes, uninitialised (on "meta" when loading); load assigns the file's.
            return torch.empty(shape, dtype=dtype) if wanted else None

        codes_bytes = packed_bytes(stored_codes_per_row(k, weight_cfg), weight_cfg.bits) if packed else 0
        self.register_buffer(WEIGHT_CODES, empty(packed, n, codes_bytes, dtype=torch.uint8))
        self.register_buffer(WEIGHT_SCALE, empty(packed, n, scale_groups(k, weight_cfg)))
        self.register_buffer(WEIGHT_LEVELS, empty(weight_levels, self.weight_grid.size if weight_levels else 0, dtype=torch.float64))
        self.register_buffer(WEIGHT_POSITIONS, empty(sparse, n, packed_bytes(k // 2, POSITION_BITS), dtype=torch.uint8))
        self.register_buffer(INPUT_LEVELS, empty(input_levels, self.input_grid.size if input_levels else 0, dtype=torch.float64))
        self.register_buffer(INPUT_SCALE, empty(activation_cfg.learnable_scale))
        # A 16-bit weight stays the latent weight; the forward rotates (and masks) it as training did.
        self.weight = None if packed else nn.Parameter(torch.empty(n, k, dtype=self.weight_dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n, dtype=self.weight_dtype), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        def side(c: QuantizerConfig) -> str:
            return "16-bit" if not c.enabled else f"{c.bits}-bit {c.grid}" + (" 2:4" if c.sparsity == "2:4" else "")

        w = self.weight_cfg
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weight={side(w)}, "
            f"activation={side(self.activation_cfg)}, rotation={w.rotation}, path={self.path}"
        )

    def _kernel_reason(self) -> str | None:
        """Why the low-bit kernels cannot run this layer (None: they can); asked once."""
        k, w, a = self.in_features, self.weight_cfg, self.activation_cfg
        integer = forward_path(w, a) == "integer"
        return lowbit_unsupported_reason(
            integer=integer, k=k, weight_group=k // scale_groups(k, w), input_group=k // scale_groups(k, a) if integer else k,
            dtype=str(self.weight_dtype).removeprefix("torch."),
        )  # fmt: skip

    def _fused_input_cfg(self) -> QuantizerConfig | None:
        """The activation config for the fused rotate + RMS + round kernel (the "ste" estimator:
        its forward is every estimator's, and it writes no gradient mask), or None where that
        kernel does not cover it (a learned scale, absmax, groups, ...): then fake_quantize."""
        a = self.activation_cfg
        if not a.enabled or a.learnable_scale:
            return None
        cfg = replace(a, estimator="ste", trust=None, clip_scale=DEFAULT_CLIP_SCALE)
        return cfg if fused_unsupported_reason(cfg) is None else None

    def unpacked_weight_codes(self) -> torch.Tensor:
        """The stored codes, uint8 [N, Kc] (Kc = K/2 under 2:4: the kept codes only)."""
        k = stored_codes_per_row(self.in_features, self.weight_cfg)
        return unpack_codes(self.weight_codes, self.weight_cfg.bits, k)

    def unpacked_weight_positions(self) -> torch.Tensor:
        """2:4 only: the in-group index (0..3) of every kept code, uint8 [N, K/2]."""
        return unpack_codes(self.weight_positions, POSITION_BITS, self.in_features // 2)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight training multiplied by, [N, K] in weight_dtype, in the rotated basis."""
        if not self.weight_cfg.enabled:
            return fake_quantize(self.weight, self.weight_cfg, None).value
        codes = self.unpacked_weight_codes()
        keep = None
        if self.weight_cfg.sparsity == "2:4":
            codes, keep = merge_two_of_four(codes, self.unpacked_weight_positions())
        value = dequantize(codes, self.weight_scale, self.weight_grid)
        if keep is not None:
            value = value * keep  # as training: pruned entries are exactly zero
        return value.to(self.weight_dtype)

    def _apply(self, fn, recurse: bool = True):  # a move or cast leaves the kept weight stale
        self._cpu_weight = None
        return super()._apply(fn, recurse)

    def _cpu_forward(self, a: torch.Tensor) -> torch.Tensor:
        """The "cpu-*" paths on the quantized input a [..., K]: int4 kernel or kept decoded weight."""
        if self._cpu_weight is None:
            with torch.no_grad():
                if self.path == "cpu-int4":
                    self._cpu_weight = pack_int4(self.unpacked_weight_codes(), self.weight_scale, self.weight_grid)
                else:
                    self._cpu_weight = self.dequantized_weight()
        if self.path == "cpu-dequantize":
            return F.linear(a, self._cpu_weight, self.bias)
        y = int4_linear(a.reshape(-1, self.in_features), self._cpu_weight).reshape(*a.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path.startswith("triton-"):
            return self._triton_forward(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        a = fake_quantize(x, self.activation_cfg, self.input_grid, self.input_scale)
        if self.path.startswith("cpu-"):
            return self._cpu_forward(a.value)
        if self.path == "dequantize":
            return F.linear(a.value, self.dequantized_weight(), self.bias)
        k = self.in_features
        a_form, w_form = integer_form(self.input_grid), integer_form(self.weight_grid)
        a_codes = to_int8(a.codes.reshape(-1, k), a_form)  # [M, K]
        a_scale = a.scale.reshape(a_codes.shape[0], -1)  # [M, Ga]
        w_codes = to_int8(self.unpacked_weight_codes(), w_form)  # [N, K]
        y = integer_matmul(a_codes, a_form, a_scale, w_codes, w_form, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.double()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton paths on x [M, K]: the same integers / values as the torch paths."""
        integer = self.path == "triton-integer"
        if self.fused_input is not None:
            a = fused_fake_quantize(x, self.fused_input, self.input_grid, with_codes=integer)
        else:
            a = fake_quantize(x, self.activation_cfg, self.input_grid, self.input_scale)
        w_grid = self.weight_grid
        if not integer:
            return lowbit_dequant_matmul(
                a.value, self.weight_codes, self.weight_cfg.bits, self.weight_scale, center=w_grid.center if w_grid.uniform else None,
                levels=None if w_grid.uniform else self.weight_levels, positions=self.weight_positions, bias=self.bias,
            )  # fmt: skip
        a_form, w_form = integer_form(self.input_grid), integer_form(w_grid)
        return lowbit_int_matmul(
            a.codes, IntForm(*a_form[:4]), a.scale.reshape(x.shape[0], -1).float(), self.weight_codes,
            self.weight_cfg.bits, IntForm(*w_form[:4]), self.weight_scale, divisor=a_form.divisor * w_form.divisor,
            bias=self.bias, out_dtype=x.dtype,
        )  # fmt: skip

    @torch.no_grad()
    def check(self, name: str) -> None:
        """Validate loaded tensors (dtypes, code ranges): a corrupt file fails here, by name."""
        for suffix in (WEIGHT_CODES, WEIGHT_POSITIONS):
            t = getattr(self, suffix)
            if t is not None and t.dtype != torch.uint8:
                raise ValueError(f"{name}.{suffix} has dtype {t.dtype}; packed codes are uint8")
        for suffix in (WEIGHT_SCALE, WEIGHT_LEVELS, INPUT_LEVELS, INPUT_SCALE):
            t = getattr(self, suffix)
            if t is not None and not t.dtype.is_floating_point:
                raise ValueError(f"{name}.{suffix} has dtype {t.dtype}; it must be floating point")
        for suffix, grid in ((WEIGHT_LEVELS, self.weight_grid), (INPUT_LEVELS, self.input_grid)):
            t = getattr(self, suffix)
            if t is not None and t.tolist() != list(grid.levels):
                raise ValueError(f"{name}.{suffix} differs from the {grid.name} grid's levels at {grid.size} levels")
        if self.weight_cfg.enabled:
            top = self.unpacked_weight_codes().max().item() if self.weight_codes.numel() else 0
            if top >= self.weight_grid.size:
                raise ValueError(f"{name}.{WEIGHT_CODES} holds code {top}; the {self.weight_grid.name} grid has codes 0..{self.weight_grid.size - 1}")
        if self.weight_cfg.sparsity == "2:4" and self.weight_cfg.enabled:
            pos = self.unpacked_weight_positions().view(self.out_features, -1, 2)
            if not bool((pos[..., 0] < pos[..., 1]).all()):
                raise ValueError(f"{name}.{WEIGHT_POSITIONS} is not two ascending indices per group of 4")
