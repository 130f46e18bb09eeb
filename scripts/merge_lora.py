"""Merge a LoRA run's adapters into its base: an ordinary checkpoint that every exporter reads.

    python train.py experiment=qat_finetune model.path=DIR data.path=corpus.jsonl lora=default
    python scripts/merge_lora.py --ckpt RUN/checkpoints/last.ckpt --out merged.ckpt [--force]

The base is read from where the run found it (its model.path, or its init_from checkpoint) and
checked against the SHA-256 the checkpoint recorded; every targeted weight becomes
W + (alpha / r) B A, computed as training's forward computed it, so the merged model's
fake-quant forward is the LoRA model's bit for bit (the same codes). The quantizer configs are
unchanged and `merged_from` records the source. The exporters (export.py, export_gguf.py,
export_compressed.py, export_hf.py) also take the LoRA checkpoint directly and merge it the
same way. Bad input (a checkpoint without adapters, a missing or changed base, an existing
--out without --force) prints one `error: ...` line and exits with 2; the file is written
beside --out and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import sys

from qat.train.checkpoint import merge_lora_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of a train.py run with lora=... (e.g. <run dir>/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="the merged checkpoint to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only once the new file is complete)")
    args = p.parse_args(argv)
    try:
        out = merge_lora_checkpoint(args.ckpt, args.out, force=args.force)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"merged {args.ckpt} -> {out} (an ordinary checkpoint: weights W + (alpha / r) B A, quantizer configs unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
