"""Export a train.py checkpoint as a compressed-tensors checkpoint for vLLM / SGLang (see
qat/hf/compressed_export.py).

    python train.py quant=ct_w4a16_g128 ...        # or quant=ct_w8a16
    python scripts/export_compressed.py --ckpt RUN/checkpoints/last.ckpt --out DIR [--force]

Then `vllm serve DIR`, or with transformers and the compressed-tensors package:
    model = transformers.AutoModelForCausalLM.from_pretrained(DIR)

Every block linear is stored as packed int4 / int8 codes and float16-exact steps, checked to
decode to training's weights bit for bit. Bad input prints one `error: ...` line and exits with
2; the directory is written beside --out and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import sys

from qat.hf.compressed_export import export_compressed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (e.g. <run dir>/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="directory to write (must be absent or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only once the new one is complete)")
    args = p.parse_args(argv)
    try:
        scheme = export_compressed(args.ckpt, args.out, force=args.force)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    group = f"groups of {scheme['group']}" if scheme["group"] else "one scale per channel"
    print(f"exported {args.ckpt} -> {args.out} (W{scheme['bits']}A16, {group}, {scheme['layers']} layers; every layer decodes to training's weights exactly)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
