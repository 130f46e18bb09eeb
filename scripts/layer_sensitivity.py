"""Per-layer sensitivity: the rise in validation loss when one layer (or one layer type) is
quantized at another width, everything else as the checkpoint was trained.

    python scripts/layer_sensitivity.py --ckpt RUN/checkpoints/last.ckpt --out sens.csv
    python scripts/layer_sensitivity.py --ckpt ... --bits 2 3 4 8 --side weight --by layer --batches 4 --out sens.csv

--side weight / activation / both: which quantizer(s) of the probed layers change width.
--by layer: one target per quantized layer; --by type: one per position in the block
(qkv, proj, gate, up, down), probed in every block at once. The probe keeps each layer's
own quantizer method (rotation, scale, grid) and changes only `bits`, so a 16-bit
checkpoint trained without rotation is probed without rotation.

Cost: (1 + probes) x batches forward passes, where probes = targets x widths, less those
at a width the target already has (their rise is 0 by definition); printed before it runs.
Writes the CSV atomically (columns: qat.quant.allocation.SENSITIVITY_COLUMNS), prints the
table, and draws a target x bits heat-map PNG (--plot, default: the CSV path with .png).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from qat.inference.evaluation import loss_over
from qat.io import atomic_write, atomic_write_text
from qat.quant.allocation import SENSITIVITY_COLUMNS, SENSITIVITY_SIDES
from qat.quant.bits import parse_bits
from qat.quant.config import QuantizerConfig
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import Quantizer

BY = ("layer", "type")
QUANTIZERS = {"weight": ("weight_quantizer",), "activation": ("input_quantizer",), "both": ("weight_quantizer", "input_quantizer")}


def layer_type(name: str) -> str:
    """The glob of a layer's position in every block: layers.3.mlp.down -> layers.*.mlp.down."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def sensitivity_targets(net: torch.nn.Module, by: str) -> dict[str, list[str]]:
    """match (a layer name, or a type glob) -> the quantized layers it covers, in model order."""
    if by not in BY:
        raise ValueError(f"--by={by!r} is not allowed; choose one of {', '.join(BY)}")
    targets: dict[str, list[str]] = {}
    for name, m in net.named_modules():
        if isinstance(m, QuantLinear):
            targets.setdefault(name if by == "layer" else layer_type(name), []).append(name)
    if not targets:
        raise ValueError("the checkpoint has no quantized layers to probe")
    return targets


def probe_config(cfg: QuantizerConfig, bits: float) -> QuantizerConfig:
    """The layer's own quantizer at another width (validated like any config)."""
    return QuantizerConfig.from_mapping({**cfg.to_dict(), "bits": bits})


def already_at(net: torch.nn.Module, names: Sequence[str], side: str, bits: float) -> bool:
    """Every probed quantizer already runs at `bits`: the rise is 0 without a forward pass."""
    return all(getattr(net.get_submodule(n), q).cfg.bits == bits for n in names for q in QUANTIZERS[side])


@contextlib.contextmanager
def probing(net: torch.nn.Module, names: Sequence[str], side: str, bits: float) -> Iterator[None]:
    """The named layers' `side` quantizer(s) at `bits` inside the block, restored after."""
    saved = []
    try:
        for name in names:
            layer = net.get_submodule(name)
            for attr in QUANTIZERS[side]:
                old = getattr(layer, attr)
                saved.append((layer, attr, old))
                setattr(layer, attr, Quantizer(probe_config(old.cfg, bits)).to(layer.weight.device))
        yield
    finally:
        for layer, attr, old in reversed(saved):
            setattr(layer, attr, old)


def probe_count(net: torch.nn.Module, targets: dict[str, list[str]], bits: Sequence[float], side: str) -> int:
    return sum(not already_at(net, names, side, b) for names in targets.values() for b in bits)


def measure(net: torch.nn.Module, batches: list, targets: dict[str, list[str]], bits: Sequence[float], side: str, device: str) -> list[dict]:
    """One row per (target, width): the loss with only that target changed, and its rise."""
    for names in targets.values():  # every probe config is valid before any forward pass
        for b in bits:
            for n in names:
                for q in QUANTIZERS[side]:
                    try:
                        probe_config(getattr(net.get_submodule(n), q).cfg, b)
                    except ValueError as err:
                        raise ValueError(f"layer {n} {q} at {b:g} bits: {err}") from None
    base = loss_over(net, batches, device)["loss"]
    rows = []
    for match, names in targets.items():
        params = sum(net.get_submodule(n).weight.numel() for n in names)
        for b in bits:
            if already_at(net, names, side, b):
                loss = base
            else:
                with probing(net, names, side, b):
                    loss = loss_over(net, batches, device)["loss"]
            rows.append({"match": match, "layers": len(names), "side": side, "bits": b, "params": params, "loss": loss, "delta": loss - base})
    return rows


def csv_text(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SENSITIVITY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "loss": f"{r['loss']:.6f}", "delta": f"{r['delta']:.6f}"})
    return buf.getvalue()


def table_text(rows: Sequence[dict], bits: Sequence[float]) -> str:
    """Target x bits table of loss rises, for the terminal."""
    matches = list(dict.fromkeys(r["match"] for r in rows))
    delta = {(r["match"], r["bits"]): r["delta"] for r in rows}
    width = max(len(m) for m in matches)
    lines = [f"{'target':<{width}}  {'params':>11}  " + "  ".join(f"{f'{b:g}-bit':>9}" for b in bits)]
    params = {r["match"]: r["params"] for r in rows}
    for m in matches:
        lines.append(f"{m:<{width}}  {params[m]:>11,}  " + "  ".join(f"{delta[(m, b)]:>+9.4f}" for b in bits))
    return "\n".join(lines)


def write_heatmap(rows: Sequence[dict], bits: Sequence[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matches = list(dict.fromkeys(r["match"] for r in rows))
    delta = {(r["match"], r["bits"]): r["delta"] for r in rows}
    grid = [[delta[(m, b)] for b in bits] for m in matches]  # [targets, widths]
    fig, ax = plt.subplots(figsize=(1.2 * len(bits) + 3, 0.35 * len(matches) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(bits)), [f"{b:g}" for b in bits])
    ax.set_yticks(range(len(matches)), matches, fontsize=7)
    ax.set_xlabel("bits")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=6, color="tab:blue")
    fig.colorbar(image, ax=ax, label="val loss increase")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def val_batches(config: dict, tokenizer: object, batches: int | None) -> list:
    """The run's own validation batches (the first `batches` of them), held in memory."""
    from qat.train.lifecycle import build_datamodule

    dm = build_datamodule(config["data"], tokenizer, stage="validate", **({"val_batches": batches} if batches is not None else {}))
    return list(dm.val_dataloader())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (16-bit or quantized)")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--bits", nargs="+", type=float, default=[2, 3, 4, 8], help="candidate widths (default 2 3 4 8)")
    p.add_argument("--side", choices=SENSITIVITY_SIDES, default="weight", help="which quantizer(s) of a target change width")
    p.add_argument("--by", choices=BY, default="layer", help="one target per layer, or per layer type across blocks")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's data.val_batches)")
    p.add_argument("--plot", default=None, help="heat-map PNG (default: --out with .png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        bits = sorted({parse_bits(int(b) if float(b).is_integer() else b) for b in args.bits})
        if args.batches is not None and args.batches < 1:
            raise ValueError(f"--batches={args.batches} must be an integer >= 1")
        if not Path(args.ckpt).is_file():
            what = "is a directory" if Path(args.ckpt).is_dir() else "does not exist"
            raise ValueError(f"--ckpt {args.ckpt!r} {what}; give a checkpoint file of train.py (RUN/checkpoints/last.ckpt)")
        from qat.train.checkpoint import load_trained  # Lightning/Hydra: only past the argument checks

        model = load_trained(args.ckpt, args.device)
        targets = sensitivity_targets(model.net, args.by)
        batches = val_batches(model.config, model.tokenizer, args.batches)
        probes = probe_count(model.net, targets, bits, args.side)
        x = batches[0][0]
        print(f"cost: (1 + {probes} probes) x {len(batches)} batches = {(1 + probes) * len(batches)} forward passes "
              f"of {x.shape[0]} x {x.shape[1]} tokens ({len(targets)} targets x {len(bits)} widths, {args.side} side)")  # fmt: skip
        started = time.perf_counter()
        rows = measure(model.net, batches, targets, bits, args.side, args.device)
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, csv_text(rows))
    plot = Path(args.plot) if args.plot else Path(args.out).with_suffix(".png")
    write_heatmap(rows, bits, plot, f"{args.side} sensitivity, {Path(args.ckpt).name} step {model.step}")
    print(table_text(rows, bits))
    print(f"val loss {rows[0]['loss'] - rows[0]['delta']:.4f} as trained; {time.perf_counter() - started:.1f} s; wrote {args.out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
