"""Import a GGUF Llama (llama.cpp's format) as a Hugging Face directory (see qat/hf/gguf_import.py).

    pip install -e ".[gguf]"
    python scripts/import_gguf.py model.gguf --out DIR [--dtype float32|bfloat16] [--force]
    python train.py model=hf model.path=DIR

transformers' GGUF reader dequantizes every tensor (Q8_0, Q4_K, ...) and rebuilds the config
and the tokenizer; DIR is a plain save_pretrained directory (model.safetensors, config.json
without a quantization_config, tokenizer.json). Bad input prints one `error: ...` line and
exits with 2, before any weight is read.
"""

from __future__ import annotations

import argparse
import sys

from qat.hf.gguf_import import DTYPES, import_gguf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", help="the .gguf file (one file; architecture llama)")
    p.add_argument("--out", required=True, help="directory to write (must be absent or empty unless --force)")
    p.add_argument("--dtype", default="float32", help=f"tensor dtype in the directory: {' | '.join(DTYPES)} (default float32)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only once the new one is complete)")
    args = p.parse_args(argv)
    try:
        out = import_gguf(args.gguf, args.out, dtype=args.dtype, force=args.force)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"imported {args.gguf} ({args.dtype}) -> {out}; train with: python train.py model=hf model.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
