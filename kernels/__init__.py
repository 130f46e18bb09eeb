"""Fused Triton kernels for the QAT training path.

`fused_quantize_rows(x, block, scalars)` computes what the torch fake-quantizer computes
(Hadamard rotation, RMS scale, grid rounding, the estimator's gradient mask) in one pass
over memory, with a fused backward H(g ⊙ mask). This package is the lowest layer: it
imports nothing from `qat` or `models`; the caller (`qat.quant.fused`) derives the constants
from its config and grid. Importing it does not import Triton; kernels are built on first use.
Their reference is the library's own torch path, `qat.quant.fake_quantize`.

The packed low-bit forward has its own kernels: `lowbit_int_matmul` (int8 codes x packed
weight codes on int8 tensor cores) and `lowbit_dequant_matmul` (float activations x packed
weights decoded in registers); their references are qat.packed.linear's torch paths.

Read first: support.py (the one backend decision), plan.py (tiling, constants),
hadamard_quant.py (the kernels), ops.py (custom ops, autograd); lowbit_plan.py,
lowbit_gemm.py, lowbit_ops.py for the low-bit GEMMs; aot.py compiles the kernels for Hopper
without a GPU (registers, spills, shared memory, PTX checks).
"""

from kernels.lowbit_ops import IntForm, lowbit_dequant_matmul, lowbit_int_accumulators, lowbit_int_matmul
from kernels.lowbit_plan import GemmTiles, lowbit_unsupported_reason
from kernels.ops import FusedQuantized, fused_quantize_rows
from kernels.plan import MAX_FUSED_BLOCK, QuantScalars, interpreting
from kernels.support import tensor_unsupported_reason, unsupported_config_reason, use_triton

__all__ = [
    "MAX_FUSED_BLOCK",
    "FusedQuantized",
    "GemmTiles",
    "IntForm",
    "QuantScalars",
    "fused_quantize_rows",
    "interpreting",
    "lowbit_dequant_matmul",
    "lowbit_int_accumulators",
    "lowbit_int_matmul",
    "lowbit_unsupported_reason",
    "tensor_unsupported_reason",
    "unsupported_config_reason",
    "use_triton",
]
