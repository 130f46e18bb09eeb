"""CPU inference speed of a real Llama: transformers against our import, fake-quant and packed.

    python scripts/bench_inference.py --model smollm2-dir [--gguf model.gguf] [--tokens 32] [--prefill 512] \
        [--update-doc docs/benchmarks.md]

One process, one model directory (any save_pretrained Llama). Rows: `transformers` fp32 (the
reference), our unquantized import, fake-quant W4A4 and W4A16 (eval: the quantized weights are
computed once and kept; W4A16 also with the input rotation folded into the cached weight, as
generate.py --ckpt decodes), and packed W4A4, W4A16 and W2A16 (exported and loaded as
scripts/export.py and load_packed do; "auto" backend: float32 models keep the decoded weight,
bfloat16 models run torch's int4 kernel). Quantized rows use full Hadamard
rotation, the model=hf default. For each: greedy decoding at batch 1 (a short prompt is
prefilled, then --tokens steps against the KV cache are timed) and a prefill of --prefill
tokens (one forward), both in tokens/s and as a ratio to transformers measured in this run.
With llama-cpp-python installed and --gguf given, llama.cpp's decode rate on the same threads
is printed too. --update-doc replaces the table between its `bench_inference` markers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qat.io import atomic_write_text

BEGIN, END = "<!-- bench_inference:begin -->", "<!-- bench_inference:end -->"


def best_of(run: Callable[[], float], repeat: int = 2) -> float:
    """The fastest of `repeat` timings after one warm-up run (run returns its own seconds)."""
    run()
    return min(run() for _ in range(repeat))


def wall(step: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    return run


@torch.no_grad()
def our_rates(net: torch.nn.Module, prompt: list[int], tokens: int, prefill: int, vocab: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of one of our models (KV cache, greedy)."""
    net.eval()

    def decode() -> float:  # the prompt is prefilled untimed; the steps are timed
        cache = net.new_kv_cache(1, len(prompt) + tokens)
        nxt = net(torch.tensor([prompt]), cache)[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(tokens):
            nxt = net(nxt, cache)[:, -1:].argmax(-1)
        return time.perf_counter() - started

    long = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))
    return tokens / best_of(decode), prefill / best_of(wall(lambda: net(long)))


@torch.no_grad()
def transformers_rates(model, prompt: list[int], tokens: int, prefill: int, vocab: int) -> tuple[float, float]:
    def decode() -> float:
        out = model(torch.tensor([prompt]), use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - started

    long = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))
    return tokens / best_of(decode), prefill / best_of(wall(lambda: model(long, use_cache=False)))


def llama_cpp_rate(gguf: str, prompt: str, tokens: int) -> float | None:
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        return None
    llm = LlamaCpp(model_path=gguf, n_threads=torch.get_num_threads(), n_ctx=512, verbose=False)
    llm(prompt, max_tokens=4, temperature=0.0)  # warm-up
    started = time.perf_counter()
    out = llm(prompt, max_tokens=tokens, temperature=0.0)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - started)


def build_rows(model_dir: str, tokens: int, prefill: int) -> list[tuple[str, Callable[[], torch.nn.Module]]]:
    """(name, builder) for our rows; built one at a time to keep one model in memory."""
    from qat import QuantizerConfig, quantize_model
    from qat.hf.load import load_hf_llama
    from qat.hf.tokenizer import checkpoint_tokenizer
    from qat.packed.export import export_packed
    from qat.packed.load import load_packed
    from qat.quant.linear import fold_input_rotations

    def fake(w: int, a: int, fold: bool = False) -> torch.nn.Module:
        net = load_hf_llama(model_dir)
        quantize_model(net, QuantizerConfig(bits=w, hadamard_block="full"), QuantizerConfig(bits=a, hadamard_block="full"))
        if fold:
            fold_input_rotations(net)
        return net

    def packed(w: int, a: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        with tempfile.TemporaryDirectory() as tmp:
            out = export_packed(fake(w, a).to(dtype).eval(), checkpoint_tokenizer(model_dir), {"model": {"path": model_dir}}, 0, Path(tmp) / "m")
            return load_packed(out).net

    return [
        ("ours, unquantized import", lambda: load_hf_llama(model_dir)),
        ("fake-quant W4A4 (eval, cached)", lambda: fake(4, 4)),
        ("fake-quant W4A16 (eval, cached)", lambda: fake(4, 16)),
        ("fake-quant W4A16 (eval, cached, input rotation moved into the weight, as generate.py decodes)", lambda: fake(4, 16, fold=True)),
        ("packed W4A4", lambda: packed(4, 4)),
        ("packed W4A16", lambda: packed(4, 16)),
        ("packed W2A16", lambda: packed(2, 16)),
        # bfloat16 models take torch's int4 kernel (fast only on bfloat16 activations)
        ("packed W4A16, bfloat16 model (int4 kernel)", lambda: packed(4, 16, torch.bfloat16)),
        ("packed W4A4, bfloat16 model (int4 kernel)", lambda: packed(4, 4, torch.bfloat16)),
    ]


def table(rows: list[tuple[str, float, float]], reference: tuple[float, float], llama_cpp: float | None, header: str) -> str:
    lines = [header, "", "| model | decode tokens/s | x transformers | prefill tokens/s | x transformers |", "|---|---:|---:|---:|---:|"]
    lines.append(f"| transformers fp32 (reference) | {reference[0]:.1f} | 1.00 | {reference[1]:.0f} | 1.00 |")
    for name, dec, pre in rows:
        lines.append(f"| {name} | {dec:.1f} | {dec / reference[0]:.2f} | {pre:.0f} | {pre / reference[1]:.2f} |")
    if llama_cpp is not None:
        lines.append(f"| llama.cpp (llama-cpp-python, the GGUF as shipped) | {llama_cpp:.1f} | {llama_cpp / reference[0]:.2f} | | |")
    return "\n".join(lines) + "\n"


def check_args(args: argparse.Namespace) -> tuple[object, int, str | None]:
    """Every input checked before a model is loaded: (the model's tokenizer, its context, the
    text of --update-doc). The model directory is read as far as its config and tensor headers."""
    from qat.hf.load import check_checkpoint
    from qat.hf.tokenizer import checkpoint_tokenizer

    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"--model={args.model!r} is not a save_pretrained directory (no config.json)")
    if args.tokens < 1 or args.prefill < 1:
        raise ValueError(f"--tokens={args.tokens} and --prefill={args.prefill} must be >= 1")
    context = check_checkpoint(args.model)[0].max_seq_len
    if args.prefill > context or args.tokens >= context:
        raise ValueError(f"--prefill={args.prefill} and --tokens={args.tokens} must fit the model's context of {context}")
    tokenizer = checkpoint_tokenizer(args.model)
    if args.gguf is not None:
        from qat.hf.gguf_import import check_file

        check_file(Path(args.gguf))
    doc = None
    if args.update_doc:
        try:
            doc = Path(args.update_doc).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--update-doc={args.update_doc!r} cannot be read as UTF-8 text ({type(err).__name__}); give a Markdown file") from None
        if BEGIN not in doc or END not in doc.split(BEGIN, 1)[1]:
            raise ValueError(f"--update-doc={args.update_doc!r} has no {BEGIN} ... {END} markers")
    return tokenizer, context, doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained Llama directory")
    p.add_argument("--gguf", help="the same model as a GGUF, for llama.cpp's row (needs llama-cpp-python)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    p.add_argument("--prefill", type=int, default=512, help="prefill length timed")
    p.add_argument("--rows", nargs="*", default=None, help="only our rows whose name starts with one of these")
    p.add_argument("--update-doc", help="a Markdown file whose bench_inference block gets the table")
    args = p.parse_args(argv)
    try:
        tokenizer, context, doc = check_args(args)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        import transformers
    except ImportError:
        print('error: the reference row needs transformers: pip install -e ".[hf]"', file=sys.stderr)
        return 2
    text = "The old lighthouse keeper climbed the stairs every evening, counting the steps"
    prompt = tokenizer.encode(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    prompt = prompt[: context - args.tokens]
    reference = transformers_rates(hf, prompt, args.tokens, args.prefill, vocab)
    del hf
    print(f"transformers fp32: decode {reference[0]:.1f} tokens/s, prefill {reference[1]:.0f} tokens/s", flush=True)
    rows = []
    for name, build in build_rows(args.model, args.tokens, args.prefill):
        if args.rows and not any(name.startswith(r) for r in args.rows):
            continue
        dec, pre = our_rates(build(), prompt, args.tokens, args.prefill, vocab)
        rows.append((name, dec, pre))
        print(f"{name}: decode {dec:.1f} tokens/s ({dec / reference[0]:.2f}x), prefill {pre:.0f} tokens/s ({pre / reference[1]:.2f}x)", flush=True)
    llama_cpp = llama_cpp_rate(args.gguf, text, args.tokens) if args.gguf else None
    header = f"{Path(args.model).name}: {torch.get_num_threads()} threads, torch {torch.__version__}, decode {args.tokens} tokens, prefill {args.prefill}"
    out = table(rows, reference, llama_cpp, header)
    print(out)
    if args.update_doc:
        head, rest = doc.split(BEGIN, 1)
        atomic_write_text(args.update_doc, f"{head}{BEGIN}\n{out}{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
