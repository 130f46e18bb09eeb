"""Sample text from a train.py checkpoint with its quantized forward.

    python scripts/generate.py --ckpt outputs/.../checkpoints/last.ckpt --prompt "farm:" --tokens 200
"""

from __future__ import annotations

import argparse
import sys

import torch

from qat.train.checkpoint import load_trained
from qat.inference.evaluation import sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (e.g. <run dir>/checkpoints/last.ckpt)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.samples < 1:
        print(f"error: --tokens={args.tokens} and --samples={args.samples} must be >= 1", file=sys.stderr)
        return 2
    try:
        model = load_trained(args.ckpt, args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tok = model.tokenizer
    prompt = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.samples):
        out = sample(
            model.net, prompt, args.tokens, args.temperature, args.top_k or None,
            max_seq_len=model.config["data"]["seq_len"], generator=gen, stop_id=tok.eos_id,
        )
        text = tok.decode([t for t in out if t != tok.eos_id])
        print(f"--- sample {i} (step {model.step}) ---\n{args.prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
