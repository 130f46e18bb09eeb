"""Packed-model sizes and CPU decode speed (no GPU needed).

    python scripts/bench_packed.py --sizes 30M 100M 430M --out bench_packed.json

For each size: a model with random weights, quantized (QuEST int grid, Hadamard; every
bit-width given by --bits, ternary as 1.58), exported packed; against the same model's
plain weights written as a bf16 safetensors file (the model is held in bf16, so the packed
directory keeps embeddings, norms and lm_head in bf16 too). Reports the directory bytes, the linear
weight bytes against bits/16 of their bf16 size, and the ratio. Then CPU decode tokens/s
of a packed debug model against its fake-quant model (greedy, KV cache, --decode-tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def _run_config(size: str, bits: float, seq_len: int) -> dict[str, Any]:
    quant = {"bits": bits, "rotation": "hadamard", "grid": "int" if bits != 1.58 else "int_zero"}
    return {"model": {"size": size}, "data": {"seq_len": seq_len}, "quant": {"weight": quant, "activation": quant}}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def size_rows(size: str, bits_list: Sequence[float], vocab: int) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    from qat.packed.export import export_packed
    from qat.packed.packing import packed_bytes
    from qat.quant.linear import QuantLinear
    from qat.train.lifecycle import build_net

    rows = []
    for bits in bits_list:
        torch.manual_seed(0)
        cfg = _run_config(size, bits, 128)
        net = build_net(cfg, vocab).to(torch.bfloat16)  # as trained with bf16 weights: the rest stays bf16
        with tempfile.TemporaryDirectory() as tmp:
            bf16 = Path(tmp) / "bf16.safetensors"
            save_file({k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items()}, str(bf16))
            out = export_packed(net, _tokenizer_with_vocab(vocab), cfg, 0, Path(tmp) / "packed")
            linears = [m for m in net.modules() if isinstance(m, QuantLinear)]
            codes = sum(m.out_features * packed_bytes(m.in_features, bits) for m in linears)
            bf16_linear = sum(2 * m.weight.numel() for m in linears)
            scales = sum(4 * m.out_features for m in linears)
            rows.append({
                "size": size, "bits": bits, "non_embedding_params": net.num_params(non_embedding=True),
                "bf16_file_bytes": bf16.stat().st_size, "packed_dir_bytes": _dir_bytes(out),
                "linear_bf16_bytes": bf16_linear, "linear_code_bytes": codes, "linear_scale_bytes": scales,
                "code_fraction_of_bf16": codes / bf16_linear, "ideal_fraction": bits / 16,
                "dir_ratio": _dir_bytes(out) / bf16.stat().st_size,
            })  # fmt: skip
        del net
    return rows


def _tokenizer_with_vocab(vocab: int) -> Any:
    """A byte tokenizer claiming a larger vocabulary: sizes do not depend on the text, and
    the embedding and lm_head then have the QuEST runs' shape."""
    from qat.data.tokenizer import ByteTokenizer

    wide = ByteTokenizer()
    wide.vocab_size = vocab
    return wide


def decode_rows(size: str, bits: float, tokens: int) -> list[dict[str, Any]]:
    from qat.data.tokenizer import ByteTokenizer
    from qat.inference.generation import generate
    from qat.packed.export import export_packed
    from qat.packed.load import load_packed
    from qat.train.lifecycle import build_net

    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = _run_config(size, bits, 512)
    net = build_net(cfg, tok.vocab_size).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_packed(net, tok, cfg, 0, Path(tmp) / "packed")
        packed = load_packed(Path(tmp) / "packed").net.eval()
        for name, model in (("fake-quant", net), ("packed", packed)):
            generate(model, [1, 2, 3], 4, temperature=0)  # warm-up
            started = time.perf_counter()
            out = generate(model, [1, 2, 3], tokens, temperature=0)
            seconds = time.perf_counter() - started
            rows.append({"size": size, "bits": bits, "model": name, "tokens": len(out), "seconds": seconds, "tokens_per_s": len(out) / seconds, "first_tokens": out[:8]})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["30M", "100M", "430M"])
    ap.add_argument("--bits", nargs="+", type=float, default=[1, 1.58, 2, 3, 4, 8])
    ap.add_argument("--vocab", type=int, default=50304, help="vocabulary of the size runs (QuEST's GPT-2 padding)")
    ap.add_argument("--decode-size", default="debug")
    ap.add_argument("--decode-bits", type=float, default=4)
    ap.add_argument("--decode-tokens", type=int, default=200)
    ap.add_argument("--out", default="bench_packed.json", help="JSON results (written atomically)")
    args = ap.parse_args(argv)
    from qat.models.sizes import MODEL_SIZES
    from qat.io import atomic_write_json
    from qat.quant.bits import parse_bits

    try:
        bits = [parse_bits(b) for b in args.bits]
        unknown = [s for s in [*args.sizes, args.decode_size] if s not in MODEL_SIZES]
        if unknown or 16 in bits or args.decode_tokens < 1:
            raise ValueError(f"--sizes/--decode-size must be in {', '.join(MODEL_SIZES)} (got {unknown}); --bits 1..8 or 1.58; --decode-tokens >= 1")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(torch.get_num_threads())
    sizes = [row for size in args.sizes for row in size_rows(size, bits, args.vocab)]
    print("| size | bits | bf16 file (MB) | packed dir (MB) | dir ratio | linear codes / bf16 | bits/16 |")
    print("|---|---|---|---|---|---|---|")
    for r in sizes:
        print(f"| {r['size']} | {r['bits']:g} | {r['bf16_file_bytes'] / 1e6:.1f} | {r['packed_dir_bytes'] / 1e6:.1f} | {r['dir_ratio']:.3f} | {r['code_fraction_of_bf16']:.4f} | {r['ideal_fraction']:.4f} |")
    decode = decode_rows(args.decode_size, parse_bits(args.decode_bits), args.decode_tokens)
    for r in decode:
        print(f"decode {r['size']} w{r['bits']:g}a{r['bits']:g} {r['model']}: {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens, first {r['first_tokens']})")
    atomic_write_json(args.out, {"sizes": sizes, "decode": decode, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
