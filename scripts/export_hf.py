"""Export a train.py checkpoint as a Hugging Face Llama directory (see qat/hf/export.py).

    python scripts/export_hf.py --ckpt RUN/checkpoints/last.ckpt --out DIR [--weights latent|quantized] [--force]

Then, with no custom code:
    model = transformers.AutoModelForCausalLM.from_pretrained(DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DIR)

--weights latent exports the trained high-precision weights; quantized exports each weight
as the quantized layer multiplies it (fake-quantized, rotated back), so transformers computes
our model with quantized weights and 16-bit activations. Bad input prints one `error: ...`
line and exits with 2.
"""

from __future__ import annotations

import argparse
import sys

from qat.hf.export import DTYPES, WEIGHT_CHOICES, export_hf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (e.g. <run dir>/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="directory to write (must be absent or empty unless --force)")
    p.add_argument("--weights", default="latent", help=f"{' | '.join(WEIGHT_CHOICES)} (default latent)")
    p.add_argument("--dtype", default="float32", help=f"tensor dtype in the file: {' | '.join(DTYPES)} (default float32, exact)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only once the new one is complete)")
    args = p.parse_args(argv)
    try:
        out = export_hf(args.ckpt, args.out, weights=args.weights, dtype=args.dtype, force=args.force)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"exported {args.ckpt} ({args.weights} weights) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
