"""llama.cpp as a measuring instrument, through llama-cpp-python (`pip install -e ".[llamacpp]"`):
its own post-training quantizer, its perplexity on given token windows and its decode speed.

Token ids are fed to llama.cpp directly, never text: every model scores the same tokens as our
evaluation does (`scripts/evaluate.py`), whatever llama.cpp's tokenizer would make of the text.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qat.inference.compare import quiet_native_stderr  # llama.cpp logs every tensor to fd 2

# llama.cpp's post-training targets (llama_ftype) and the types its embedding and output head
# may be given (ggml_type); llama.cpp's QAT conversion keeps both in Q8_0.
QUANTIZE_TARGETS = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",  # the type llama.cpp users pick by default (rows K-quants cannot take fall back)
}  # fmt: skip
EMBEDDING_TARGETS = {"q8_0": "GGML_TYPE_Q8_0", "f16": "GGML_TYPE_F16"}


def require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as err:
        raise ValueError('llama-cpp-python is not installed; pip install -e ".[llamacpp]" (it builds llama.cpp, about 7 minutes)') from err
    return llama_cpp


def quantize_gguf(src: str | Path, out: str | Path, target: str = "q4_0", embeddings: str = "q8_0", threads: int | None = None) -> Path:
    """llama.cpp's own quantizer (what `llama-quantize` runs): every linear of `src` to `target`,
    the token embedding and output head to `embeddings`. Written beside `out`, renamed when done."""
    if target not in QUANTIZE_TARGETS:
        raise ValueError(f"target={target!r} is not allowed; choose one of {', '.join(QUANTIZE_TARGETS)}")
    if embeddings not in EMBEDDING_TARGETS:
        raise ValueError(f"embeddings={embeddings!r} is not allowed; choose one of {', '.join(EMBEDDING_TARGETS)}")
    if not Path(src).is_file():
        raise ValueError(f"{src} is not a GGUF file")
    llama_cpp = require_llama_cpp()
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZE_TARGETS[target])
    params.token_embedding_type = params.output_tensor_type = getattr(llama_cpp, EMBEDDING_TARGETS[embeddings])
    params.nthread = threads or os.cpu_count() or 1
    with quiet_native_stderr():
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), params)
    if status != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's quantizer failed on {src} (status {status})")
    os.replace(partial, out)
    return out


def reports_amx(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports Intel AMX tiles (False where /proc/cpuinfo cannot be read)."""
    try:
        return "amx_tile" in Path(cpuinfo).read_text()
    except OSError:
        return False


@contextlib.contextmanager
def _without_extra_buffer_types(llama_cpp: Any) -> Iterator[None]:
    """Models loaded inside get llama_model_params.use_extra_bufts = false (llama-cpp-python's
    Llama takes no argument for it, so its default-params function is wrapped meanwhile)."""
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def params() -> Any:
        out = default()
        out.use_extra_bufts = False
        return out

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


def load_llama(path: str | Path, n_ctx: int, threads: int = 1, logits_all: bool = False) -> Any:
    """A GGUF in llama.cpp (llama_cpp.Llama; the caller closes it). Where the CPU reports AMX,
    the weights are not repacked into llama.cpp's extra buffer types: on a 2-core Xeon VM that
    reports AMX (llama-cpp-python 0.3.36 built there), decoding a Q4_0 file through them died in
    a general protection fault inside libggml-cpu, and without them it runs. The plain CPU
    kernels compute the same quantized dot products."""
    llama_cpp = require_llama_cpp()
    plain = _without_extra_buffer_types(llama_cpp) if reports_amx() else contextlib.nullcontext()
    with quiet_native_stderr(), plain:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, n_threads=threads, verbose=False, seed=0)


@contextlib.contextmanager
def opened(path: str | Path, n_ctx: int, threads: int, logits_all: bool = False) -> Iterator[Any]:
    llm = load_llama(path, n_ctx, threads, logits_all)
    try:
        yield llm
    finally:
        llm.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_loss(path: str | Path, windows: Sequence[Sequence[int]], threads: int = 1) -> dict[str, float]:
    """Mean next-token cross-entropy over windows of token ids, each scored from its own start
    (window[:-1] in, window[1:] predicted), as our `loss_over` scores (inputs, targets) rows."""
    if not windows or min(len(w) for w in windows) < 2:
        raise ValueError("windows must be a non-empty list of token sequences of length >= 2")
    total, count = 0.0, 0
    with opened(path, max(len(w) for w in windows), threads, logits_all=True) as llm:
        for window in windows:
            logp = _log_softmax(window_logits(llm, window))
            total -= float(logp[np.arange(len(window) - 1), np.asarray(window[1:])].sum())
            count += len(window) - 1
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


def window_logits(llm: Any, window: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits [len(window) - 1, vocab] for window[:-1], scored from the window's start."""
    llm.reset()
    llm.eval(list(window[:-1]))
    return np.asarray(llm.scores[: len(window) - 1])


def window_agreement(path: str | Path, reference: str | Path, windows: Sequence[Sequence[int]], threads: int = 1) -> dict[str, float]:
    """llama-perplexity --kl-divergence's statistics of the GGUF `path` against the GGUF
    `reference`, both run by llama.cpp on the same windows (qat.inference.agreement)."""
    import torch

    from qat.inference.agreement import AgreementMeter

    n_ctx = max(len(w) for w in windows)
    meter = AgreementMeter()
    with opened(path, n_ctx, threads, logits_all=True) as llm, opened(reference, n_ctx, threads, logits_all=True) as ref:
        for window in windows:
            targets = torch.tensor(window[1:])
            meter.update(torch.from_numpy(window_logits(llm, window).copy()), torch.from_numpy(window_logits(ref, window).copy()), targets)
    return meter.result()


def speed(path: str | Path, prompt: Sequence[int], tokens: int, threads: int = 1) -> dict[str, float]:
    """llama.cpp's greedy decode rate (batch 1, one token per call, as `generate.py` decodes) and
    its prefill rate over `prompt`, in tokens/s; the best of two runs of each."""
    decode, prefill = math.inf, math.inf
    with opened(path, len(prompt) + tokens, threads) as llm:
        for _ in range(2):
            llm.reset()
            started = time.perf_counter()
            llm.eval(list(prompt))
            prefill = min(prefill, time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(tokens):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            decode = min(decode, time.perf_counter() - started)
    return {"decode_tokens_per_s": tokens / decode, "prefill_tokens_per_s": len(prompt) / prefill}
