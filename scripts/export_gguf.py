"""Export a train.py checkpoint as a llama.cpp GGUF file (see qat/packed/gguf_export.py).

    python train.py quant=gguf_q4_0 ...            # or quant=gguf_q8_0
    python scripts/export_gguf.py --ckpt RUN/checkpoints/last.ckpt --out model.gguf \\
        [--embeddings q8_0|f16] [--tokenizer-gguf SRC.gguf] [--force]

Each quantized linear becomes Q4_0 / Q8_0 blocks built from training's own codes and float16
steps, checked to decode to training's weight bit for bit; llama.cpp, Ollama and LM Studio then
run the trained model. --embeddings: how the embedding and output head (16-bit in training) are
stored. --tokenizer-gguf copies every tokenizer.* key of that file (the GGUF the model was
imported from with scripts/import_gguf.py); without it the checkpoint's tokenizer is converted
(our byte tokenizer, or a byte-level BPE tokenizer.json). Bad input prints one `error: ...`
line and exits with 2; the file is written beside --out and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import sys

from qat.packed.gguf_export import EMBEDDING_TYPES, export_gguf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (e.g. <run dir>/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="the .gguf file to write (must not exist unless --force)")
    p.add_argument("--embeddings", default="q8_0", help=f"embedding and output head type: {' | '.join(EMBEDDING_TYPES)} (default q8_0)")
    p.add_argument("--tokenizer-gguf", default=None, help="copy the tokenizer from this GGUF instead of converting the checkpoint's")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only once the new file is complete)")
    args = p.parse_args(argv)
    try:
        counts = export_gguf(args.ckpt, args.out, embeddings=args.embeddings, tokenizer_gguf=args.tokenizer_gguf, force=args.force)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    print(f"exported {args.ckpt} -> {args.out} ({summary} tensors; every quantized tensor decodes to training's weights exactly)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
