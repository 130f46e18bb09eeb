"""QAT for llama.cpp's Q4_0 (or Q4_1, --type q4_1) against llama.cpp's own post-training
quantization to the same type, measured in llama.cpp.

    python train.py quant=bf16 ...        RUN16     # the 16-bit fine-tuning
    python train.py quant=gguf_q4_0 ...   RUNQ4     # QAT for Q4_0, the same data and tokens
    python scripts/gguf_study.py --baseline-ckpt RUN16/checkpoints/last.ckpt \\
        --qat-ckpt RUNQ4/checkpoints/last.ckpt --out STUDY [--tokenizer-gguf SRC.gguf]

Four GGUF files, each scored by llama.cpp on the same held-out token windows (the QAT
checkpoint's own validation data, the windows `scripts/evaluate.py --ckpt` scores):
  16-bit     the baseline: F32 linears, F16 embedding and head (scripts/export_gguf.py);
  PTQ Q4_0   that file through llama.cpp's quantizer (`llama-quantize`'s Q4_0, embedding and
             head in Q8_0 as llama.cpp's QAT targets keep them);
  PTQ Q4_K_M that file through llama.cpp's Q4_K_M, the type its users pick by default (its own
             embedding and head types), for its size and quality next to QAT Q4_0;
  QAT Q4_0   the QAT checkpoint through scripts/export_gguf.py (Q8_0 embedding and head).
Reported per file: size, llama.cpp's perplexity, ours on the same windows (PyTorch, fake-quant)
where a checkpoint exists, llama-perplexity --kl-divergence's statistics against the 16-bit file
from llama.cpp's own logits (mean and 99th-percentile KL, RMS Δp, same top-1), llama.cpp's decode
and prefill tokens/s; and the headline, the share of the post-training perplexity increase that
QAT removes: (PTQ - QAT) / (PTQ - 16-bit). For a distilled QAT run, pass the unadapted 16-bit
model as --baseline-ckpt (`scripts/ptq.py --method rtn quant=bf16` writes one): its teacher.
Writes STUDY/results.md and STUDY/results.json (atomically); bad input is one `error:` line.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from qat.inference.evaluation import loss_over
from qat.inference.llama_cpp import quantize_gguf, require_llama_cpp, speed, window_agreement, window_loss
from qat.io import atomic_write_json, atomic_write_text
from qat.packed.gguf_export import export_gguf
from qat.train.checkpoint import LoadedModel, load_trained, read_checkpoint
from qat.train.lifecycle import build_datamodule


K_M = "PTQ Q4_K_M"


def heldout_batches(loaded: LoadedModel, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A loaded checkpoint's own validation (x, y) batches, the first `limit` of them."""
    dm = build_datamodule(loaded.config["data"], loaded.tokenizer, stage="validate")
    batches = []
    for x, y in dm.val_dataloader():
        if len(batches) == limit:
            break
        batches.append((x, y))
    if not batches:
        raise ValueError("the QAT checkpoint's data config yields no validation batches")
    return batches


def windows_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    """Each (x, y) row as one token window x + y[-1] (y is x shifted by one)."""
    windows = []
    for x, y in batches:
        if not torch.equal(x[:, 1:], y[:, :-1]):
            raise ValueError("validation targets are not the inputs shifted by one token")
        windows += torch.cat([x, y[:, -1:]], dim=1).tolist()
    return windows


def markdown(rows: list[dict], removed: float, kind: str) -> str:
    lines = [
        "| model | file (MiB) | llama.cpp ppl | ours (PyTorch) ppl | mean KL | KL p99 | RMS Δp (%) | same top-1 (%) | llama.cpp decode (tok/s) | llama.cpp prefill (tok/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours = f"{math.exp(r['our_loss']):.2f}" if r["our_loss"] is not None else "n/a"
        a = r["agreement"]
        kl = f"{a['kl_mean']:.4f} | {a['kl_p99']:.4f} | {a['rms_dp']:.2f} | {a['same_top1']:.2f}" if a else "(the reference) | | |"
        lines.append(
            f"| {r['model']} | {r['bytes'] / 2**20:.1f} | {math.exp(r['llama_cpp_loss']):.2f} | {ours} | {kl} "
            f"| {r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.1f} |"
        )
    lines.append("")
    lines.append(f"QAT removes {100 * removed:.1f}% of the perplexity increase of llama.cpp's post-training {kind} ((PTQ - QAT) / (PTQ - 16-bit)).")
    return "\n".join(lines) + "\n"


def check_kind(flag: str, ckpt: str, bits: float, asymmetric: bool, preset: str) -> None:
    """A checkpoint of the wrong kind is refused before anything is written."""
    saved = read_checkpoint(Path(ckpt))
    if "quantization" not in saved or "config" not in saved:
        raise ValueError(f"--{flag}={ckpt!r} was not written by train.py (no config/quantization entries); give a train.py checkpoint (RUN/checkpoints/last.ckpt)")
    weight = saved["quantization"]["weight"]
    found = (weight["bits"], weight.get("asymmetric", False) if bits != 16 else False)
    if found != (bits, asymmetric):
        kind = f"{found[0]:g}-bit{' asymmetric' if found[1] else ''}"
        raise ValueError(f"--{flag}={ckpt!r} has {kind} weights; this arm needs {bits:g}-bit{' asymmetric' if asymmetric else ''} (train it with quant={preset})")


def export_both(out: Path, exports: list[tuple[str, Path, str]], tokenizer_gguf: str | None) -> None:
    """scripts/export_gguf.py for each (checkpoint, file, embedding type) into `out`; when one is
    refused, the files written here (and `out`, if made here) are removed again."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for ckpt, file, embeddings in exports:
            export_gguf(ckpt, file, embeddings=embeddings, tokenizer_gguf=tokenizer_gguf, force=True)
            written.append(file)
    except ValueError:
        for file in written:
            file.unlink(missing_ok=True)
        if made:
            out.rmdir()
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-ckpt", required=True, help="the 16-bit run's checkpoint (quant=bf16)")
    p.add_argument("--qat-ckpt", required=True, help="the QAT run's checkpoint (quant=gguf_q4_0, or gguf_q4_1 with --type q4_1)")
    p.add_argument("--type", choices=["q4_0", "q4_1"], default="q4_0", help="the GGUF type compared (default q4_0)")
    p.add_argument("--out", required=True, help="study directory: the three GGUF files, results.md, results.json")
    p.add_argument("--tokenizer-gguf", default=None, help="copy the tokenizer from this GGUF (the one the model was imported from)")
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches scored (the QAT run's validation data)")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens timed per model")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens timed per model (at most one window)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="llama.cpp threads")
    args = p.parse_args(argv)
    try:
        for flag in ("val_batches", "decode_tokens", "prefill", "threads"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
        for flag in ("baseline_ckpt", "qat_ckpt", "tokenizer_gguf"):
            if getattr(args, flag) is not None and not Path(getattr(args, flag)).is_file():
                raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)!r} is not a file")
        check_kind("baseline-ckpt", args.baseline_ckpt, 16, False, "bf16")
        check_kind("qat-ckpt", args.qat_ckpt, 4, args.type == "q4_1", f"gguf_{args.type}")
        # The QAT run's own validation data, read before anything is written: a corpus that
        # has moved or shrunk is refused here, not after three GGUF files.
        trained = load_trained(args.qat_ckpt)
        batches = heldout_batches(trained, args.val_batches)
        windows = windows_of(batches)
        require_llama_cpp()
        out, kind = Path(args.out), args.type.upper()
        ptq, qat = f"PTQ {kind}", f"QAT {kind}"
        files = {"16-bit": out / "16-bit.gguf", ptq: out / f"ptq-{args.type}.gguf", K_M: out / "ptq-q4_k_m.gguf", qat: out / f"qat-{args.type}.gguf"}
        export_both(out, [(args.qat_ckpt, files[qat], "q8_0"), (args.baseline_ckpt, files["16-bit"], "f16")], args.tokenizer_gguf)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    quantize_gguf(files["16-bit"], files[ptq], args.type, embeddings="q8_0", threads=args.threads)
    quantize_gguf(files["16-bit"], files[K_M], "q4_k_m", embeddings="q8_0", threads=args.threads)
    prompt = windows[0][: args.prefill]
    ours = {"16-bit": loss_over(load_trained(args.baseline_ckpt).net, batches)["loss"], ptq: None, K_M: None, qat: loss_over(trained.net, batches)["loss"]}
    rows = []
    for name, path in files.items():
        scored = window_loss(path, windows, args.threads)
        rows.append({
            "model": name, "file": path.name, "bytes": path.stat().st_size, "llama_cpp_loss": scored["loss"], "our_loss": ours[name],
            "tokens_scored": scored["tokens"], **speed(path, prompt, args.decode_tokens, args.threads),
            "agreement": None if name == "16-bit" else window_agreement(path, files["16-bit"], windows, args.threads),
        })
        print(f"{name}: llama.cpp ppl {scored['perplexity']:.2f} over {scored['tokens']} tokens", flush=True)
    ppl = {r["model"]: math.exp(r["llama_cpp_loss"]) for r in rows}
    removed = (ppl[ptq] - ppl[qat]) / (ppl[ptq] - ppl["16-bit"])
    table = markdown(rows, removed, kind)
    atomic_write_json(out / "results.json", {"type": args.type, "rows": rows, "share_of_ptq_increase_removed": removed, "threads": args.threads,
                                             "baseline_ckpt": str(args.baseline_ckpt), "qat_ckpt": str(args.qat_ckpt)})
    atomic_write_text(out / "results.md", table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
