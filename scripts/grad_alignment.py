"""Gradient alignment of a checkpoint on validation batches: per layer cos(g_q, g_fp), the norm
ratio |g_q| / |g_fp| and the estimator's pass fraction (see qat/train/alignment.py).

    python scripts/grad_alignment.py --ckpt RUN/checkpoints/last.ckpt [--batches 4] [--out align.json]

Costs two forward/backward passes per batch. Prints a table, and the mean over batches.
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice

import torch

from qat.io import atomic_write_json
from qat.train.alignment import alignment_metrics, gradient_alignment
from qat.train.checkpoint import load_trained
from qat.train.lifecycle import build_datamodule


def mean_over_batches(per_batch: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    layers = per_batch[0]
    return {name: {key: sum(b[name][key] for b in per_batch) / len(per_batch) for key in layers[name]} for name in layers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--batches", type=int, default=4, help="validation batches to average over")
    p.add_argument("--out", help="write the per-layer statistics and means as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        if args.batches < 1:
            raise ValueError(f"--batches={args.batches} must be >= 1")
        model = load_trained(args.ckpt, args.device)
        dm = build_datamodule(model.config["data"], model.tokenizer, stage="validate")
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    net = model.net.train()  # the training-mode forward is the one whose gradient is measured
    per_batch = [gradient_alignment(net, x.to(args.device), y.to(args.device)) for x, y in islice(dm.val_dataloader(), args.batches)]
    stats = mean_over_batches(per_batch)
    print(f"{'layer':<24}{'cos':>8}{'|g_q|/|g_fp|':>14}{'passed':>9}")
    for name, s in stats.items():
        print(f"{name:<24}{s['cos']:>8.4f}{s['norm_ratio']:>14.4f}{s['mask_fraction']:>9.4f}")
    metrics = alignment_metrics(stats)
    print(f"mean over {len(stats)} layers and {len(per_batch)} batches: cos {metrics['align/mean_cos']:.4f}, "
          f"norm ratio {metrics['align/mean_norm_ratio']:.4f}, passed {metrics['align/mean_mask_fraction']:.4f}")  # fmt: skip
    if args.out:
        atomic_write_json(args.out, {"checkpoint": args.ckpt, "step": model.step, "batches": len(per_batch), "layers": stats, "means": metrics})
    return 0


if __name__ == "__main__":
    sys.exit(main())
