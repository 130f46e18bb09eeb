"""Benchmark the fused QAT kernels and QAT training steps on one CUDA GPU.

Kernel level (bf16, tokens x K): the fused forward (training: value + mask; export: + codes),
the fused backward H(g ⊙ mask), the unfused torch path (Quantizer backend="torch"), QuEST's
dense rotation x @ blockdiag(H_128), and fast-hadamard-transform alone when installed. Each
is reported as effective GB/s (the bytes an ideal kernel must move / time) and as a fraction
of a measured device-to-device copy (x.clone()) of the same tensor.

Model level: one training step (forward + backward + fused AdamW, bf16 autocast) of named
Llama sizes, plain bf16 vs W4A4 QuEST with the torch and the Triton backend, eager and
torch.compile'd, as ratios to bf16.

    PYTHONPATH=. python scripts/bench_kernels.py --out bench_kernels.json
    PYTHONPATH=. python scripts/bench_kernels.py --skip-models --tokens 8192 --dims 4096
    PYTHONPATH=. python scripts/bench_kernels.py --skip-kernels --sizes 430M --modes eager compiled
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

GOAL_COPY_FRACTION = 0.75  # fused forward vs a plain copy of the same bytes
GOAL_SPEEDUP = 3.0  # fused forward vs the unfused torch path
GOAL_STEP_RATIO = 1.10  # W4A4 QuEST training step vs bf16, at GOAL_STEP_SIZE
GOAL_STEP_SIZE = "430M"
VOCAB = 32000


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384], help="rows of the kernel inputs")
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="K of the kernel inputs")
    ap.add_argument("--block", type=int, default=128, help="Hadamard block of the kernel benchmarks")
    ap.add_argument("--sizes", nargs="+", default=["30M", "100M", "430M"], help="model sizes (models.MODEL_SIZES)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per training step")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps (after warm-up)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--out", default="bench_kernels.json", help="JSON results (written atomically)")
    args = ap.parse_args(argv)
    for name in ("tokens", "dims"):
        if any(v < 1 for v in getattr(args, name)):
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.block < 2 or args.block & (args.block - 1) or any(d % args.block for d in args.dims):
        ap.error(f"--block must be a power of two dividing every --dims value, got {args.block} for {args.dims}")
    from qat.models.sizes import MODEL_SIZES

    unknown = [s for s in args.sizes if s not in MODEL_SIZES]
    if unknown:
        ap.error(f"unknown --sizes {unknown}; allowed: {', '.join(MODEL_SIZES)}")
    if args.batch < 1 or args.seq < 1 or args.steps < 1:
        ap.error(f"--batch, --seq and --steps must be positive, got {args.batch}, {args.seq}, {args.steps}")
    return args


def quest_config(backend: str, block: int = 128):
    from qat import QuantizerConfig

    return QuantizerConfig(bits=4, rotation="hadamard", hadamard_block=block, backend=backend)


def time_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def kernel_rows(tokens: int, dim: int, block: int) -> list[dict]:
    import torch

    from qat import Quantizer, hadamard_matrix, make_grid
    from qat.quant.fused import fused_fake_quantize

    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    n, elt = x.numel(), x.element_size()
    cfg = quest_config("triton", block)
    grid = make_grid(cfg.bits, cfg.grid)
    mask = fused_fake_quantize(x, cfg, grid, with_codes=False).grad_mask.view(torch.uint8).reshape(tokens, dim)
    torch_quantizer = Quantizer(quest_config("torch", block)).cuda()
    fwd_bytes = 2 * n * elt + n + 4 * tokens  # x in, value out, mask out, scales out
    dense = torch.block_diag(*[hadamard_matrix(block, torch.bfloat16, "cuda")] * (dim // block))
    variants: list[tuple[str, Callable[[], object], int]] = [
        ("copy (x.clone)", lambda: x.clone(), 2 * n * elt),
        ("fused forward (training)", lambda: fused_fake_quantize(x, cfg, grid, with_codes=False), fwd_bytes),
        ("fused forward + int32 codes", lambda: fused_fake_quantize(x, cfg, grid), fwd_bytes + 4 * n),
        ("fused backward", lambda: torch.ops.qat_kernels.masked_rotate(g, mask, block), 2 * n * elt + n),
        ("torch Quantizer forward", lambda: torch_quantizer(x), fwd_bytes),
        ("dense x @ blockdiag(H)", lambda: x @ dense, 2 * n * elt),
    ]
    try:
        from fast_hadamard_transform import hadamard_transform as fht

        variants.append(("fast-hadamard-transform", lambda: fht(x.view(-1, block), block**-0.5), 2 * n * elt))
    except ImportError:
        pass
    with torch.no_grad():
        times = {name: time_ms(fn) for name, fn, _ in variants}
    copy_gbs = 2 * n * elt / times["copy (x.clone)"] / 1e6
    rows = []
    for name, _, nbytes in variants:
        gbs = nbytes / times[name] / 1e6
        rows.append(dict(tokens=tokens, K=dim, variant=name, ms=times[name], GBps=gbs, copy_fraction=gbs / copy_gbs))
        if name == "fused forward (training)":
            rows[-1]["speedup_vs_torch"] = times["torch Quantizer forward"] / times[name]
    return rows


def train_step_ms(size: str, variant: str, mode: str, batch: int, seq: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from qat.train.lifecycle import build_net

    torch.manual_seed(0)
    quant = {"bits": 16, "rotation": "none"} if variant == "bf16" else quest_config(variant.removeprefix("w4a4-")).to_dict()
    run = {"model": {"size": size}, "data": {"seq_len": seq}, "quant": {"weight": quant, "activation": quant}}
    model = build_net(run, VOCAB).cuda()  # the same builder as train.py
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if mode == "compiled" else model
    idx = torch.randint(0, VOCAB, (batch, seq + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile, autotune and allocator warm-up
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    del model, opt, forward
    torch.cuda.empty_cache()
    return ms


def model_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            base = None
            for variant in ("bf16", "w4a4-torch", "w4a4-triton"):
                t0 = time.time()
                ms = train_step_ms(size, variant, mode, args.batch, args.seq, args.steps)
                base = ms if variant == "bf16" else base
                rows.append(dict(size=size, mode=mode, variant=variant, ms_per_step=ms, ratio_to_bf16=ms / base))
                print(f"  {size} {mode} {variant}: {ms:.1f} ms/step ({time.time() - t0:.0f} s)", flush=True)
    return rows


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    table = [list(columns)] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


def goal_lines(kernels: list[dict], models: list[dict]) -> list[str]:
    lines = []
    fused = [r for r in kernels if r["variant"] == "fused forward (training)"]
    if fused:
        worst_copy = min(r["copy_fraction"] for r in fused)
        worst_speed = min(r["speedup_vs_torch"] for r in fused)
        lines.append(f"fused forward >= {GOAL_COPY_FRACTION:.0%} of copy bandwidth: worst {worst_copy:.0%} "
                     f"[{'met' if worst_copy >= GOAL_COPY_FRACTION else 'NOT met'}]")
        lines.append(f"fused forward >= {GOAL_SPEEDUP:.0f}x the unfused torch path: worst {worst_speed:.2f}x "
                     f"[{'met' if worst_speed >= GOAL_SPEEDUP else 'NOT met'}]")  # fmt: skip
    for r in models:
        if r["size"] == GOAL_STEP_SIZE and r["variant"] == "w4a4-triton":
            ok = r["ratio_to_bf16"] <= GOAL_STEP_RATIO
            lines.append(f"W4A4 QuEST step ({r['mode']}, {GOAL_STEP_SIZE}) <= {GOAL_STEP_RATIO:.2f}x bf16: "
                         f"{r['ratio_to_bf16']:.3f}x [{'met' if ok else 'NOT met'}]")  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qat.kernels.support import gpu_benchmark_unavailable
    from qat.io import atomic_write_json

    if why := gpu_benchmark_unavailable("bench_kernels.py"):
        print(f"error: {why}", file=sys.stderr)
        return 2
    import triton
    kernels: list[dict] = []
    models: list[dict] = []
    if not args.skip_kernels:
        for tokens in args.tokens:
            for dim in args.dims:
                kernels += kernel_rows(tokens, dim, args.block)
        print_table(kernels, ["tokens", "K", "variant", "ms", "GBps", "copy_fraction", "speedup_vs_torch"])
    if not args.skip_models:
        print(f"training steps: batch {args.batch} x {args.seq} tokens, {args.steps} timed steps")
        models = model_rows(args)
        print_table(models, ["size", "mode", "variant", "ms_per_step", "ratio_to_bf16"])
    goals = goal_lines(kernels, models)
    print("\n".join(["goals:"] + ["  " + line for line in goals]))
    payload = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        args=vars(args),
        kernels=kernels,
        models=models,
        goals=goals,
    )
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
