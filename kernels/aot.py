"""Compile the fused kernels ahead of time for an NVIDIA target, without a GPU.

Triton ships its own ptxas, so the GPU path can be checked on any machine: that it
compiles for Hopper, that the rounding uses IEEE division and no FMA contraction (so it
repeats torch's float ops), that the rotation runs on wgmma, and how many registers and
how much shared memory each variant takes (what decides occupancy).

    python -m qat.kernels.aot            # tables for the training and low-bit kernels on sm_90

For the low-bit GEMMs (lowbit_gemm.py) it also checks, at the benchmark tile sizes, that
the integer GEMMs multiply on int8 tensor cores (mma/wgmma with .s8 operands) and that no
kernel spills to local memory; the exit status is 1 when a check fails.
Run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from qat.kernels.lowbit_plan import GemmTiles, kernel_bits
from qat.kernels.plan import ESTIMATOR_CODES, interpreting, tiling_for

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# PTX patterns: Hopper tensor-core matmuls, IEEE (round-to-nearest) division, fused multiply-add.
WGMMA = r"wgmma\.mma_async"
IEEE_DIV = r"div\.rn\.f32"
APPROX_DIV = r"div\.(approx|full)\.f32"
FMA = r"\bfma\.rn\.f32"
S8_MMA = r"\b(?:wgmma\.mma_async|mma\.sync)\.\S*\.s8\b"  # an int8 tensor-core matmul


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


def _divisible_attrs(signature: dict[str, str], names: tuple[str, ...] = ("K",)) -> dict:
    # What a real launch specializes: 16-byte aligned pointers and ints divisible by 16 (K,
    # and for the GEMMs N and the row strides; not M).
    return {
        (i,): [["tt.divisibility", 16]]
        for i, (name, kind) in enumerate(signature.items())
        if kind != "constexpr" and (kind.startswith("*") or name in names)
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


def _check_not_interpreting() -> None:
    if interpreting():
        raise ValueError("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")


def compile_variant(v: Variant, arch: int = 90) -> Compiled:
    """Compile one kernel specialization for sm_<arch> (PTX + cubin)."""
    _check_not_interpreting()
    from qat.kernels import hadamard_quant as hq

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
    return _compile(v, fn, sig, const, arch, dict(num_warps=t.num_warps, enable_fp_fusion=False))


def _compile(v, fn, sig: dict[str, str], const: dict, arch: int, options: dict, divisible=("K",)) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {name: sig.get(name, "constexpr") for name in fn.arg_names}  # in argument order
    src = triton.compiler.ASTSource(fn, sig, constexprs=const, attrs=_divisible_attrs(sig, divisible))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
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


@dataclass(frozen=True)
class LowbitVariant:
    """One low-bit GEMM specialization, tiled as gemm_tiles tiles an [m, k] x [k, n] call on an H200."""

    kernel: str  # "int" | "dequant"
    bits: float
    m: int
    n: int = 4096
    k: int = 4096
    dtype: str = "bf16"  # the activations' (dequant) or the output's (int) dtype
    forms: tuple[tuple[int, ...], tuple[int, ...]] = ((2, 15, 1, 0), (2, 15, 1, 0))  # int: (a, w) IntegerForm
    levels: bool = False  # dequant: a level table (gaussian / fp4) instead of a uniform grid
    sparse: bool = False  # dequant: 2:4 weights

    @property
    def tiles(self) -> GemmTiles:
        from qat.kernels.lowbit_plan import gemm_tiles

        return gemm_tiles(integer=self.kernel == "int", m=self.m, n=self.n, k=self.k, segment=self.k, sms=H200_SMS)

    @property
    def name(self) -> str:
        extra = ("-levels" if self.levels else "") + ("-2:4" if self.sparse else "")
        return f"{self.kernel} w{self.bits}{extra} M={self.m}"


H200_SMS = 132
W8_INT = (1, 128, 2, 1)  # 8-bit "int" grid: u = code - 128, q = 2u + 1 (row-sum corrections)
LOWBIT_VARIANTS = [
    LowbitVariant("int", 4, 4096),  # W4A4 prefill
    LowbitVariant("int", 8, 4096, forms=(W8_INT, W8_INT)),  # W8A8 prefill
    LowbitVariant("int", 4, 16),  # W4A4 decode (split-K)
    LowbitVariant("int", 8, 1, forms=(W8_INT, W8_INT)),
    LowbitVariant("int", 1.58, 1, forms=((2, 15, 1, 0), (1, 1, 1, 0))),
    LowbitVariant("dequant", 4, 4096),  # W4A16 prefill
    LowbitVariant("dequant", 4, 4096, levels=True, sparse=True),
    *(LowbitVariant("dequant", b, 1) for b in (1, 1.58, 2, 3, 4, 8)),  # weight-only decode GEMV
    LowbitVariant("dequant", 4, 16, levels=True),
]


def compile_lowbit(v: LowbitVariant, arch: int = 90) -> Compiled:
    """Compile one low-bit GEMM specialization for sm_<arch>."""
    _check_not_interpreting()
    from qat.kernels import lowbit_gemm as lg
    from qat.kernels.lowbit_plan import row_bytes, segment_plan

    t, dt = v.tiles, DTYPES[v.dtype]
    bits, ternary = kernel_bits(v.bits)
    _, per_split, splits = segment_plan(v.k, v.k, t)
    out = f"*{dt}" if splits == 1 else "*fp32"
    sizes = dict(M="i32", N="i32", K="i32", stride_am="i32", stride_wn="i32")
    const = dict(stride_ak=1, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m, BITS=bits,
                 TERNARY=ternary, SPLIT_K=splits, HAS_BIAS=False)  # fmt: skip
    if v.kernel == "int":
        fn = lg._int_gemm_kernel
        sig = dict(a_ptr="*i32", w_ptr="*u8", sa_ptr="*fp32", sw_ptr="*fp32", bias_ptr=f"*{dt}", out_ptr=out, acc_ptr="*i32")
        sig |= sizes | {name: "i32" for name in ("GA", "GW", "GROUP_A", "GROUP_W", "SEG", "SEGS_PER_SPLIT")} | dict(inv_div="fp32")
        (a_cm, a_cs, a_mul, a_off), (w_cm, w_cs, w_mul, w_off) = v.forms
        const |= dict(A_CM=a_cm, A_CS=a_cs, A_MUL=a_mul, A_OFF=a_off, W_CM=w_cm, W_CS=w_cs, W_MUL=w_mul, W_OFF=w_off, SEGMENTED=per_split > 1,
                     STORE_ACC=False)
    else:
        fn = lg._dequant_gemm_kernel
        sig = dict(a_ptr=f"*{dt}", w_ptr="*u8", pos_ptr="*u8", table_ptr="*fp64", sw_ptr="*fp32", bias_ptr=f"*{dt}", out_ptr=out)
        sig |= sizes | dict(stride_pn="i32", GW="i32", GROUP_W="i32", K_PER_SPLIT="i32", center="fp32", N_LEVELS="i32")
        const |= dict(UNIFORM=not v.levels, SPARSE=v.sparse, LEVELS=16 if v.levels else 1, INTERPRET=False)
    # A real launch specializes the ints that are multiples of 16; a ternary row is ceil(K/5) bytes.
    stride_ok = row_bytes(v.k // 2 if v.sparse else v.k, v.bits) % 16 == 0
    divisible = ("K", "N", "stride_am", "GROUP_A", "GROUP_W", "SEG", "K_PER_SPLIT") + (("stride_wn",) if stride_ok else ())
    options = dict(num_warps=t.num_warps, num_stages=t.num_stages)
    return _compile(v, fn, sig, const, arch, options, divisible)


def lowbit_report() -> tuple[list[str], list[str]]:
    """(table lines, failed checks) for every LOWBIT_VARIANTS kernel on sm_90."""
    lines = [f"{'kernel':30} {'tiles (m n k x split)':22} {'warps':>5} {'regs':>5} {'spill':>5} {'smem':>5} {'s8 mma':>6} {'wgmma':>5}"]
    failed = []
    for v in LOWBIT_VARIANTS:
        c, t = compile_lowbit(v), v.tiles
        s8 = c.count(S8_MMA)
        tiles = f"{t.block_m}x{t.block_n}x{t.block_k} x{t.split_k}"
        lines.append(f"{v.name:30} {tiles:22} {t.num_warps:5} {c.registers!s:>5} {c.spill_bytes!s:>5} "
                     f"{c.shared_bytes // 1024:4}K {s8:6} {c.count(WGMMA):5}")  # fmt: skip
        if v.kernel == "int" and s8 == 0:
            failed.append(f"{v.name}: no int8 tensor-core MMA (mma/wgmma .s8) in the PTX")
        if c.spill_bytes:
            failed.append(f"{v.name}: spills {c.spill_bytes} bytes to local memory")
    return lines, failed


def main() -> int:
    print(f"{'kernel':9} {'dtype':5} {'K':>5} {'block':>5} {'est':5} codes  regs spill  smem  wgmma  div.rn  fma")
    for v in TRAINING_VARIANTS:
        c = compile_variant(v)
        wgmma, div_rn, fma = c.count(WGMMA), c.count(IEEE_DIV), c.count(FMA)
        print(
            f"{v.kernel:9} {v.dtype:5} {v.dim:5} {v.block:5} {v.estimator:5} {str(v.with_codes):5} {c.registers!s:>5} "
            f"{c.spill_bytes!s:>5} {c.shared_bytes // 1024:4}K {wgmma:6} {div_rn:7} {fma:4}"
        )
    lines, failed = lowbit_report()
    print("\nlow-bit GEMMs (sm_90, benchmark tiles for N = K = 4096):\n" + "\n".join(lines))
    print("checks: " + ("all hold (int8 MMA in every integer GEMM, no spills)" if not failed else "FAILED\n  " + "\n  ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
