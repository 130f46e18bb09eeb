"""Compile the fused kernels ahead of time for an NVIDIA target, without a GPU.

Triton ships its own ptxas, so the GPU path can be checked on any machine: that it
compiles for Hopper, that the rounding uses IEEE division and no FMA contraction (so it
repeats torch's float ops), that the rotation runs on wgmma, and how many registers and
how much shared memory each variant takes (what decides occupancy).

    python -m kernels.aot            # a table for the training-path variants on sm_90

Run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from kernels.plan import ESTIMATOR_CODES, interpreting, tiling_for

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# PTX patterns: Hopper tensor-core matmuls, IEEE (round-to-nearest) division, fused multiply-add.
WGMMA = r"wgmma\.mma_async"
IEEE_DIV = r"div\.rn\.f32"
APPROX_DIV = r"div\.(approx|full)\.f32"
FMA = r"\bfma\.rn\.f32"


@dataclass(frozen=True)
class Variant:
    kernel: str  # "forward" | "backward"
    dtype: str  # bf16 | fp16 | fp32
    dim: int
    block: int  # 0 = no rotation
    estimator: str = "trust"
    with_codes: bool = False


@dataclass(frozen=True)
class Compiled:
    variant: Variant
    ptx: str
    registers: int | None  # None when cuobjdump is unavailable
    spill_bytes: int | None
    shared_bytes: int

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.ptx))


def _divisible_attrs(signature: dict[str, str]) -> dict:
    # What a real launch specializes: 16-byte aligned pointers and K % 16 == 0 (not M).
    return {
        (i,): [["tt.divisibility", 16]]
        for i, (name, kind) in enumerate(signature.items())
        if kind != "constexpr" and (kind.startswith("*") or name == "K")
    }


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def compile_variant(v: Variant, arch: int = 90) -> Compiled:
    """Compile one kernel specialization for sm_<arch> (PTX + cubin)."""
    if interpreting():
        raise ValueError("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import hadamard_quant as hq

    t = tiling_for(v.dim, v.block)
    dt = DTYPES[v.dtype]
    common = dict(BLOCK_M=t.block_m, TILE_K=t.tile_k, BLOCK=t.block, INNER=t.inner, OUTER=t.outer, NUM_TILES=t.num_tiles)
    if v.kernel == "forward":
        fn = hq._quantize_fwd_kernel
        sig = dict(x_ptr=f"*{dt}", out_ptr=f"*{dt}", mask_ptr="*u8", codes_ptr="*i32", scale_ptr="*fp32", M="i32", K="i32")
        sig |= {name: "fp32" for name in ("inv_sqrt", "scale_factor", "center", "offset", "trust", "clip")}
        const = common | dict(ROTATE=t.rotate, ESTIMATOR=ESTIMATOR_CODES[v.estimator], STORE_CODES=v.with_codes)
    else:
        fn = hq._masked_rotate_kernel
        sig = dict(g_ptr=f"*{dt}", mask_ptr="*u8", out_ptr=f"*{dt}", M="i32", K="i32", inv_sqrt="fp32")
        const = common | dict(ROTATE=t.rotate, USE_MASK=v.estimator != "ste")
    const["INTERPRET"] = False
    sig |= {name: "constexpr" for name in const}
    src = triton.compiler.ASTSource(fn, sig, constexprs=const, attrs=_divisible_attrs(sig))
    kernel = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=t.num_warps, enable_fp_fusion=False)
    )
    regs, spill = _resources(kernel.asm["cubin"])
    return Compiled(v, kernel.asm["ptx"], regs, spill, int(kernel.metadata.shared))


TRAINING_VARIANTS = [
    Variant("forward", "bf16", 1024, 128),
    Variant("forward", "bf16", 4608, 128),
    Variant("forward", "fp32", 1664, 128),
    Variant("forward", "bf16", 4096, 4096),
    Variant("forward", "bf16", 4096, 128, "clip", with_codes=True),
    Variant("forward", "bf16", 3000, 0, "ste"),
    Variant("backward", "bf16", 4608, 128),
    Variant("backward", "fp32", 4096, 1024),
]


def main() -> int:
    print(f"{'kernel':9} {'dtype':5} {'K':>5} {'block':>5} {'est':5} codes  regs spill  smem  wgmma  div.rn  fma")
    for v in TRAINING_VARIANTS:
        c = compile_variant(v)
        wgmma, div_rn, fma = c.count(WGMMA), c.count(IEEE_DIV), c.count(FMA)
        print(
            f"{v.kernel:9} {v.dtype:5} {v.dim:5} {v.block:5} {v.estimator:5} {str(v.with_codes):5} {c.registers!s:>5} "
            f"{c.spill_bytes!s:>5} {c.shared_bytes // 1024:4}K {wgmma:6} {div_rn:7} {fma:4}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
