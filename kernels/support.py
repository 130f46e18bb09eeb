"""The one backend decision: does the fused Triton path serve this quantizer and this tensor?

Asked in two steps so that the config part is decided once, when a quantizer (or a packed
layer) is built, and only the cheap tensor part runs per call:

    reason = unsupported_config_reason(...)      # once, at construction: None or why not
    use_triton(backend, reason, x)                # per call: dtype and device

`backend="triton"` turns every "no" into a one-line error; `"auto"` falls back to torch;
`"torch"` never uses the kernels.
"""

from __future__ import annotations

import torch

from qat.kernels.plan import ESTIMATOR_CODES, MAX_FUSED_BLOCK, interpreting

BACKENDS = ("auto", "torch", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED_GRIDS = ("int", "int_zero")
FUSED_SCALES = ("rms_mse",)


def unsupported_config_reason(*, enabled: bool, grid: str, scale: str, estimator: str, granularity: int | str, sparsity: str) -> str | None:
    """None when the fused quantization kernels cover this quantizer, else why not (one phrase)."""
    rules = (
        (enabled, "bits=16"),
        (grid in FUSED_GRIDS, f"grid={grid!r} (supported: {', '.join(map(repr, FUSED_GRIDS))})"),
        (scale in FUSED_SCALES, f"scale={scale!r} (supported: {', '.join(map(repr, FUSED_SCALES))})"),
        (estimator in ESTIMATOR_CODES, f"estimator={estimator!r} (supported: {', '.join(map(repr, ESTIMATOR_CODES))})"),
        (granularity == "row", f"granularity={granularity!r} (supported: 'row')"),
        (sparsity == "none", f"sparsity={sparsity!r} (supported: 'none')"),
    )
    return next((why for ok, why in rules if not ok), None)


def kernel_rotates(block: int) -> bool:
    """Whether the fused kernels rotate by Hadamard blocks of `block` themselves: Sylvester
    blocks (powers of two) up to MAX_FUSED_BLOCK. Any other block, too long for one program's
    registers or not a power of two (H_m ⊗ H_p with m a Paley order, a dense factor the kernel
    does not build), is rotated by the caller first and quantized unrotated here (block 0)."""
    return 0 < block <= MAX_FUSED_BLOCK and block & (block - 1) == 0


def tensor_unsupported_reason(x: torch.Tensor) -> str | None:
    """None when the kernels can run on x (dtype, device, a non-empty row), else why not."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} (supported: float32, bfloat16, float16)"
    if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
        return f"device {x.device} (needs CUDA, or the CPU with TRITON_INTERPRET=1)"
    if x.dim() == 0 or x.shape[-1] == 0:
        return f"shape {tuple(x.shape)} (needs a non-empty last dim)"
    return None


def use_triton(backend: str, config_reason: str | None, x: torch.Tensor) -> bool:
    """Whether this call takes the Triton path. backend="auto" uses it on CUDA only (the
    interpreter is for tests, asked for explicitly); "triton" raises where it cannot."""
    if backend == "torch":
        return False
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {', '.join(map(repr, BACKENDS))}")
    why = config_reason or tensor_unsupported_reason(x)
    if backend == "triton":
        if why:
            raise ValueError(f"backend='triton' does not support {why}; use backend='auto' or 'torch'")
        return True
    return why is None and x.is_cuda


def gpu_benchmark_unavailable(script: str) -> str | None:
    """Why `script` (a GPU benchmark) cannot run here, or None: it needs CUDA and compiled
    kernels, not the interpreter."""
    if not torch.cuda.is_available():
        return f"{script} measures GPU kernels and needs CUDA; none is available"
    if interpreting():
        return "TRITON_INTERPRET=1 is set; unset it to benchmark compiled kernels"
    return None
