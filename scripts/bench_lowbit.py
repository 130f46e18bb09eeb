"""Benchmark the packed low-bit forward (kernels/lowbit_gemm.py) on one CUDA GPU.

1. Prefill GEMM: W4A4 and W8A8 (QuEST "int" grids, activations Hadamard-128 rotated) against
   bf16 torch.mm (cuBLAS) for M x (N, K). The low-bit time includes the activation's fused
   rotate + RMS + round to int32 codes; the integer GEMM alone is reported next to it.
2. Weight-only decode GEMV: W{1,1.58,2,3,4,8}A16 (uniform grid, bf16 activations) at batch
   1/4/16. Effective bandwidth = bytes the kernel must read (packed weight, scales,
   activations) / time, as a fraction of a measured device copy; and the speedup over bf16.
3. Decode tokens/s (batch 1, KV cache, eager) of packed 430M and 1.6B models (random weights,
   exported and loaded through the packed format; 32k vocabulary) against the bf16 model.

Times are medians of triton.testing.do_bench, which flushes L2 before every run. Writes
JSON (atomically), prints markdown tables and which goals hold.

    python scripts/bench_lowbit.py --out bench_lowbit.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

GOAL_W4A4_GEMM = 1.5  # x bf16 cuBLAS at M = N = K = 4096, activation quantization included
GOAL_W4A16_COPY = 0.70  # of copy bandwidth, batch 1
GOAL_W4A16_SPEEDUP = 3.0  # x bf16 at batch 1
GOAL_W1_SPEEDUP = 6.0  # W1A16 and ternary x bf16 at batch 1
GOAL_DECODE = 2.5  # packed 1.6B decode tokens/s x bf16
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)
VOCAB = 32000
DECODE_FORMATS = {  # name: (weight, activation) quantizer configs
    "w4a4": ({"bits": 4}, {"bits": 4}),  # QuEST: Hadamard-128 on both sides, int grids
    "w4a16": ({"bits": 4, "rotation": "none"}, {"bits": 16, "rotation": "none"}),  # weight-only
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemm-m", type=int, nargs="+", default=[1, 16, 128, 1024, 4096, 16384], help="rows of the prefill GEMMs")
    ap.add_argument("--gemv-batch", type=int, nargs="+", default=[1, 4, 16], help="rows of the decode GEMVs")
    ap.add_argument("--sizes", nargs="+", default=["430M", "1.6B"], help="model sizes for the decode benchmark")
    ap.add_argument("--formats", nargs="+", choices=list(DECODE_FORMATS), default=list(DECODE_FORMATS))
    ap.add_argument("--decode-tokens", type=int, default=128, help="timed decode steps per model")
    ap.add_argument("--skip", nargs="*", choices=["gemm", "gemv", "decode"], default=[], help="parts to leave out")
    ap.add_argument("--out", default="bench_lowbit.json", help="JSON results (written atomically)")
    args = ap.parse_args(argv)
    if any(v < 1 for v in args.gemm_m + args.gemv_batch) or args.decode_tokens < 1:
        ap.error("--gemm-m, --gemv-batch and --decode-tokens must be positive")
    if any(b > 16 for b in args.gemv_batch):
        ap.error(f"--gemv-batch {args.gemv_batch}: decode batches are 1..16")
    from qat.models.sizes import MODEL_SIZES

    if unknown := [s for s in args.sizes if s not in MODEL_SIZES]:
        ap.error(f"unknown --sizes {unknown}; allowed: {', '.join(MODEL_SIZES)}")
    return args


def time_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def packed_weight(n: int, k: int, bits: float, grid: str = "int"):
    """Random codes of an [n, k] weight, packed, and per-row fp32 scales, on the GPU."""
    import torch

    from qat.packed.packing import pack_codes
    from qat.quant.grids import make_grid

    g = make_grid(bits, grid)
    codes = torch.randint(0, g.size, (n, k), device="cuda")
    return g, pack_codes(codes, bits), torch.rand(n, 1, device="cuda") + 0.5


def gemm_row(m: int, n: int, k: int, bits: int) -> dict:
    import torch

    from qat.kernels.lowbit_ops import IntForm, lowbit_dequant_matmul, lowbit_int_matmul
    from qat.kernels.ops import fused_quantize_rows
    from qat.kernels.plan import QuantScalars
    from qat.packed.format import integer_form

    g, packed, sw = packed_weight(n, k, bits)
    form = integer_form(g)
    f = IntForm(*form[:4])
    scalars = QuantScalars(g.gaussian_scale, float(g.center), 1.0, 1.0, "ste")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    qz = fused_quantize_rows(x, 128, scalars)

    def gemm(q) -> object:
        return lowbit_int_matmul(q.codes, f, q.scale.view(-1, 1), packed, bits, f, sw, divisor=form.divisor**2, out_dtype=torch.bfloat16)

    with torch.inference_mode():
        t_bf16 = time_ms(lambda: torch.mm(x, w.T))
        t_low = time_ms(lambda: gemm(fused_quantize_rows(x, 128, scalars)))
        t_gemm = time_ms(lambda: gemm(qz))
    flops = 2 * m * n * k
    return dict(kind=f"W{bits}A{bits}", M=m, N=n, K=k, bf16_ms=t_bf16, lowbit_ms=t_low, int_gemm_ms=t_gemm,
                lowbit_TOPS=flops / t_low / 1e9, speedup=t_bf16 / t_low)  # fmt: skip


def copy_gbps() -> float:
    import torch

    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    return 2 * buf.numel() / time_ms(lambda: buf.clone()) / 1e6


def gemv_row(batch: int, n: int, k: int, bits: float, copy: float) -> dict:
    import torch

    from qat.kernels.lowbit_ops import IntForm, lowbit_dequant_matmul, lowbit_int_matmul
    from qat.kernels.ops import fused_quantize_rows
    from qat.kernels.plan import QuantScalars

    g, packed, sw = packed_weight(n, k, bits)
    x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        t_bf16 = time_ms(lambda: torch.mm(x, w.T))
        t_low = time_ms(lambda: lowbit_dequant_matmul(x, packed, bits, sw, center=g.center))
    read = packed.numel() + 4 * sw.numel() + 2 * x.numel()
    gbps = read / t_low / 1e6
    return dict(kind=f"W{bits}A16", batch=batch, N=n, K=k, bf16_ms=t_bf16, lowbit_ms=t_low, GBps=gbps,
                copy_fraction=gbps / copy, speedup=t_bf16 / t_low)  # fmt: skip


def _tokenizer(root: Path):
    """A 32k-entry word-level tokenizer file: load_packed checks the vocabulary's size."""
    from tokenizers import Tokenizer, models

    from qat.data.tokenizer import HFTokenizer

    vocab = {f"<{i}>": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="<0>")).save(str(root / "vocab.json"))
    return HFTokenizer(str(root / "vocab.json"))


def _bf16_llama(size: str):
    import torch

    from qat.models.llama import Llama
    from qat.models.sizes import llama_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        return Llama(llama_config(size, vocab_size=VOCAB, max_seq_len=2048)).to(torch.bfloat16).eval()


def tokens_per_s(net, steps: int, prompt: int = 16) -> float:
    """Greedy decode at batch 1 against a KV cache; the argmax stays on the GPU."""
    import torch

    cache = net.new_kv_cache(1, prompt + steps + 4)
    nxt = torch.randint(0, VOCAB, (1, prompt), device="cuda")
    with torch.inference_mode():
        for _ in range(4):  # prefill, then warm-up steps (autotuning, allocator)
            nxt = net(nxt, cache)[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            nxt = net(nxt, cache)[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


def decode_rows(args: argparse.Namespace) -> list[dict]:
    import torch

    from qat.packed.export import export_packed
    from qat.packed.load import load_packed
    from qat.quant.convert import quantize_model

    rows = []
    for size in args.sizes:
        net = _bf16_llama(size)
        base = tokens_per_s(net, args.decode_tokens)
        rows.append(dict(size=size, model="bf16", tokens_per_s=base, speedup=1.0))
        del net
        for fmt in args.formats:
            with tempfile.TemporaryDirectory() as tmp:
                net = _bf16_llama(size)
                quantize_model(net, *DECODE_FORMATS[fmt])
                run = {"model": {"size": size}, "data": {"seq_len": 2048}, "note": "bench_lowbit: random weights"}
                path = export_packed(net, _tokenizer(Path(tmp)), run, 0, Path(tmp) / "packed")
                del net
                torch.cuda.empty_cache()
                packed = load_packed(path, "cuda", backend="triton").net
            tps = tokens_per_s(packed, args.decode_tokens)
            rows.append(dict(size=size, model=f"packed {fmt} (triton)", tokens_per_s=tps, speedup=tps / base))
            print(f"  {size} {fmt}: {tps:.1f} tokens/s ({tps / base:.2f}x bf16)", flush=True)
            del packed
            torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows])


def _goal(text: str, value: float, target: float, unit: str = "x") -> str:
    shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
    return f"{text}: {shown} [{'met' if value >= target else 'NOT met'}]"


def goal_lines(gemm: list[dict], gemv: list[dict], decode: list[dict]) -> list[str]:
    lines = []
    for r in gemm:
        if r["kind"] == "W4A4" and r["M"] == r["N"] == r["K"] == 4096:
            lines.append(_goal(f"W4A4 GEMM 4096^3 incl. quantization >= {GOAL_W4A4_GEMM}x bf16 cuBLAS", r["speedup"], GOAL_W4A4_GEMM))
    batch1 = [r for r in gemv if r["batch"] == 1]
    w4 = [r for r in batch1 if r["kind"] == "W4A16"]
    if w4:
        lines.append(_goal(f"W4A16 GEMV batch 1 >= {GOAL_W4A16_COPY:.0%} of copy bandwidth (worst shape)", min(r["copy_fraction"] for r in w4), GOAL_W4A16_COPY, "%"))
        lines.append(_goal(f"W4A16 GEMV batch 1 >= {GOAL_W4A16_SPEEDUP}x bf16 (worst shape)", min(r["speedup"] for r in w4), GOAL_W4A16_SPEEDUP))
    for kind in ("W1A16", "W1.58A16"):
        if rows := [r for r in batch1 if r["kind"] == kind]:
            lines.append(_goal(f"{kind} GEMV batch 1 >= {GOAL_W1_SPEEDUP}x bf16 (worst shape)", min(r["speedup"] for r in rows), GOAL_W1_SPEEDUP))
    for r in decode:
        if r["size"] == "1.6B" and r["model"] != "bf16":
            lines.append(_goal(f"1.6B decode, {r['model']} >= {GOAL_DECODE}x bf16 tokens/s", r["speedup"], GOAL_DECODE))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qat.kernels.support import gpu_benchmark_unavailable
    from qat.io import atomic_write_json

    if why := gpu_benchmark_unavailable("bench_lowbit.py"):
        print(f"error: {why}", file=sys.stderr)
        return 2
    import triton
    gemm, gemv, decode = [], [], []
    copy = copy_gbps()
    print(f"device copy: {copy:.0f} GB/s")
    if "gemm" not in args.skip:
        gemm = [gemm_row(m, n, k, bits) for bits in (4, 8) for n, k in SHAPES for m in args.gemm_m]
        print("\n" + markdown_table(gemm, ["kind", "M", "N", "K", "bf16_ms", "lowbit_ms", "int_gemm_ms", "lowbit_TOPS", "speedup"]))
    if "gemv" not in args.skip:
        gemv = [gemv_row(b, n, k, bits, copy) for bits in (1, 1.58, 2, 3, 4, 8) for n, k in SHAPES for b in args.gemv_batch]
        print("\n" + markdown_table(gemv, ["kind", "batch", "N", "K", "bf16_ms", "lowbit_ms", "GBps", "copy_fraction", "speedup"]))
    if "decode" not in args.skip:
        decode = decode_rows(args)
        print("\n" + markdown_table(decode, ["size", "model", "tokens_per_s", "speedup"]))
    goals = goal_lines(gemm, gemv, decode)
    print("\n".join(["", "goals:"] + ["- " + line for line in goals]))
    payload = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, args=vars(args),
                   copy_GBps=copy, gemm=gemm, gemv=gemv, decode=decode, goals=goals)  # fmt: skip
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
