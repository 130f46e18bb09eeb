"""Sample text from a trained model with its quantized forward and a KV cache.

    python scripts/generate.py --model EXPORT_DIR --prompt "farm:" --tokens 200     # packed (scripts/export.py)
    python scripts/generate.py --ckpt RUN/checkpoints/last.ckpt --prompt "farm:"     # training checkpoint

Prints each sample and the decode speed (tokens/s, prefill included).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from qat.inference.generation import generate, sample_text
from qat.inference.loading import load_model
from qat.quant.linear import fold_input_rotations


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="directory written by scripts/export.py (packed low-bit model)")
    source.add_argument("--ckpt", help="checkpoint written by train.py (e.g. <run dir>/checkpoints/last.ckpt)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token (slow; for checks)")
    p.add_argument("--unfolded", action="store_true",
                   help="--ckpt: rotate every 16-bit input as training does, instead of folding the rotation into the cached weight (bit for bit training's forward; slower)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cpu"], default="auto",
                   help="a packed model's kernels: auto = Triton on CUDA, the int4 kernel path on the CPU (cpu), torch = the reference; triton on the CPU needs TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.samples < 1:
        print(f"error: --tokens={args.tokens} and --samples={args.samples} must be >= 1", file=sys.stderr)
        return 2
    try:
        model = load_model(args.ckpt, args.model, args.device, args.backend)
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if not args.unfolded:
        fold_input_rotations(model.net)  # a no-op for a packed model and for quantized inputs
    tok = model.tokenizer
    prompt = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.samples):
        started = time.perf_counter()
        out = generate(
            model.net, prompt, args.tokens, args.temperature, args.top_k or None,
            max_seq_len=model.net.cfg.max_seq_len, generator=gen, stop_id=tok.eos_id, use_cache=not args.no_cache,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        print(f"--- sample {i} (step {model.step}) ---\n{sample_text(tok, prompt, out)}")
        print(f"[{len(out)} tokens in {seconds:.2f} s: {len(out) / seconds:.1f} tokens/s, {model.source}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
