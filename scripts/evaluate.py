"""Evaluate a trained model: val loss / perplexity on any configured data, and
multiple-choice accuracy (HellaSwag JSONL format), with its quantized forward.

    python scripts/evaluate.py --model EXPORT_DIR                                # a packed export (scripts/export.py)
    python scripts/evaluate.py --ckpt RUN/checkpoints/last.ckpt                  # a checkpoint, the run's own val data
    python scripts/evaluate.py --ckpt ... data=local data.path=valid.jsonl data.val_batches=50
    python scripts/evaluate.py --ckpt ... --hellaswag hellaswag_val.jsonl --limit 1000
    python scripts/evaluate.py --ckpt ... --reference smollm2 --out metrics.json  # against the 16-bit model

--reference DIR|CKPT scores the model against another one on the same tokens, as llama.cpp's
`llama-perplexity --kl-divergence` does: both perplexities, the mean per-token KL(reference ||
model) and its 99th percentile, RMS Δp (the change in the true token's probability, in %) and
same top-1 (the share of positions where both pick the same token, in %).

Data overrides use the training config syntax (group=option key=value) on top of the
checkpoint's own config. JSONL lines: {"ctx": str, "endings": [str, ...], "label": int}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat.inference.evaluation import loss_over, multiple_choice_accuracy
from qat.inference.agreement import AgreementMeter
from qat.inference.loading import load_model, load_reference
from qat.io import atomic_write_json
from qat.train.lifecycle import build_datamodule
from qat.train.run_config import config_errors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HELLASWAG_LINE = '{"ctx": str, "endings": [str, ...], "label": int}'


def data_config(run_config: dict, overrides: list[str]):
    """The checkpoint's data config, or a freshly composed one when data overrides are given."""
    if not overrides:
        return OmegaConf.create(run_config)["data"]
    with config_errors(), initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):  # `data=nope`: one line
        return compose("train", overrides=overrides).data


@torch.no_grad()
def score_against(net, reference, batches, device) -> tuple[dict, dict]:
    """(val loss / ppl / tokens, the agreement metrics) in one pass over the batches."""
    meter = AgreementMeter()
    for x, y in batches:
        x = x.to(device)
        logits, ref = net(x), reference(x)
        if logits.shape[-1] != ref.shape[-1]:
            raise ValueError(f"--reference has a vocabulary of {ref.shape[-1]}, the model {logits.shape[-1]}; compare models with the same tokenizer")
        meter.update(logits, ref, y.to(device))
    r = meter.result()
    return {"loss": math.log(r["ppl"]), "ppl": r["ppl"], "tokens": r["tokens"]}, r


def read_examples(path: str, limit: int | None) -> list:
    """The first `limit` multiple-choice examples of a JSONL file, read before any scoring; a
    file that is not UTF-8 JSON lines is one line naming it (multiple_choice_accuracy checks
    each example's keys)."""
    examples: list = []
    number = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if line.strip():
                    examples.append(json.loads(line))
    except UnicodeDecodeError as err:
        raise ValueError(f"--hellaswag={path!r} is not UTF-8 (byte {err.object[err.start]:#04x} at offset {err.start}); give a JSON lines file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--hellaswag={path!r} line {number} is not JSON ({err.msg}); each line must be {HELLASWAG_LINE}") from None
    return examples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="directory written by scripts/export.py (packed low-bit model)")
    source.add_argument("--ckpt", help="checkpoint written by train.py")
    p.add_argument("--hellaswag", help="multiple-choice JSONL file (HellaSwag format)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N multiple-choice examples")
    p.add_argument("--no-loss", action="store_true", help="skip the val-loss evaluation")
    p.add_argument("--reference", help="score against this model on the same tokens (KL, RMS Δp, same top-1): "
                   "a save_pretrained directory (the 16-bit model), a train.py checkpoint or a packed export")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cpu"], default="auto",
                   help="a packed model's kernels: auto = Triton on CUDA, the int4 kernel path on the CPU (cpu), torch = the reference; triton on the CPU needs TRITON_INTERPRET=1")
    p.add_argument("overrides", nargs="*", help="data overrides, e.g. data=local data.path=valid.jsonl")
    args = p.parse_intermixed_args(argv)  # overrides may stand before and after the options
    try:
        if args.hellaswag and not Path(args.hellaswag).is_file():
            raise ValueError(f"--hellaswag={args.hellaswag!r} does not exist")
        if args.reference and args.no_loss:
            raise ValueError("--reference scores the val tokens; it cannot go with --no-loss")
        if args.reference and not Path(args.reference).exists():
            raise ValueError(f"--reference={args.reference!r} does not exist (expected a save_pretrained directory, a train.py checkpoint or a packed export)")
        if args.out and Path(args.out).is_dir():
            raise ValueError(f"--out={args.out!r} is a directory; give the JSON file to write")
        examples = read_examples(args.hellaswag, args.limit) if args.hellaswag else None
        model = load_model(args.ckpt, args.model, args.device, args.backend)
        dm = None
        if not args.no_loss:
            dm = build_datamodule(data_config(model.config, args.overrides), model.tokenizer, stage="validate")  # a bad corpus: one line
        reference = load_reference(args.reference, args.device) if args.reference else None
        metrics: dict = {"model": model.source, "step": model.step}
        if dm is not None:
            started = time.perf_counter()
            if reference is None:
                metrics["val"] = loss_over(model.net, dm.val_dataloader(), args.device)
            else:
                metrics["val"], metrics["reference"] = score_against(model.net, reference[0], dm.val_dataloader(), args.device)
                metrics["reference"]["model"] = reference[1]
            metrics["val"]["tokens_per_s"] = metrics["val"]["tokens"] / (time.perf_counter() - started)
            if dm.loss_floor is not None:
                metrics["val"]["loss_floor"] = dm.loss_floor
        if examples is not None:
            metrics["multiple_choice"] = multiple_choice_accuracy(model.net, model.tokenizer, examples)
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    if args.out:
        atomic_write_json(args.out, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
