"""Fused Triton kernels for the QAT training path.

`fused_quantize(x, cfg)` computes what `qat.Quantizer(cfg).forward` computes (Hadamard
rotation, RMS scale, grid rounding, the estimator's gradient mask) in one pass over
memory, with a fused backward H(g ⊙ mask). Importing this package does not import
Triton; the kernels are built on first use.

Read first: plan.py (tiling and constants), hadamard_quant.py (the kernels), ops.py
(custom ops, autograd, the public functions), reference.py (the torch reference);
aot.py compiles the kernels for Hopper without a GPU (registers, shared memory, PTX checks).
"""

from kernels.ops import FusedQuantized, fused_quantize, fused_quantize_rows
from kernels.plan import MAX_FUSED_BLOCK

__all__ = ["MAX_FUSED_BLOCK", "FusedQuantized", "fused_quantize", "fused_quantize_rows"]
