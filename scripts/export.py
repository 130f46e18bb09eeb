"""Export a train.py checkpoint as a packed low-bit model directory (see qat/packed/format.py).

    python scripts/export.py --ckpt outputs/.../checkpoints/last.ckpt --out packed/w4a4 [--force]

Writes config.json, model.safetensors (packed integer weight codes, scales, and the
16-bit tensors) and, for a Hugging Face tokenizer, tokenizer.json. Load it with
qat.packed.load.load_packed. Bad input prints one `error: ...` line and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qat.packed.export import export_checkpoint
from qat.packed.format import WEIGHTS_FILE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (e.g. <run dir>/checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="directory to write (must be absent or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (only once the new one is complete)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, force=args.force)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    size = (Path(out) / WEIGHTS_FILE).stat().st_size
    print(f"exported {args.ckpt} -> {out} ({size:,} bytes of tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
