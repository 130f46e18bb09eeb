"""Export a train.py checkpoint as a llama.cpp GGUF file (what scripts/export_gguf.py runs).

What llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs is then what was trained: each
quantized linear becomes Q4_0, Q4_1 or Q8_0 blocks built from the codes, scales and offsets of
its own weight quantizer, never re-quantized from floats, and checked bit for bit against
training before a byte is written (gguf_tensors.py: which configs those blocks hold, the block
layouts, the check). The tokenizer is copied from a GGUF (`tokenizer_gguf`) or converted
(gguf_tokenizer.py). This file checks the request, writes the architecture metadata, the
tokenizer and the tensors beside `out`, and renames the finished file to `out`.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from qat.packed.gguf_tensors import Tensor, check_exportable, model_tensors
from qat.packed.gguf_tokenizer import converted_tokenizer, copied_tokenizer

EMBEDDING_TYPES = ("q8_0", "f16")
MAGIC = b"GGUF"


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ValueError(f"the Python package 'gguf' is missing ({err}); install it: pip install -e \".[gguf]\"") from None
    return gguf


def file_type(gguf: Any, tensors: dict[str, Tensor]) -> Any:
    kinds = {t.qtype for t in tensors.values()}
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return F.MOSTLY_Q4_0 if Q.Q4_0 in kinds else F.MOSTLY_Q4_1 if Q.Q4_1 in kinds else F.MOSTLY_Q8_0 if Q.Q8_0 in kinds else F.MOSTLY_F16 if Q.F16 in kinds else F.ALL_F32


def write_gguf(path: Path, net: nn.Module, tensors: dict[str, Tensor], tokenizer: list, name: str, provenance: dict) -> None:
    """The architecture metadata, the tokenizer entries and the tensors into `path`."""
    import gguf

    cfg = net.cfg
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    if cfg.head_dim != cfg.d_model // cfg.n_head:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type(gguf, tensors))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("qat.quantization", json.dumps(provenance, sort_keys=True))  # llama.cpp ignores other keys
    for key, value, vtype, sub in tokenizer:
        writer.add_key_value(key, value, vtype, sub)
    for tensor_name, t in tensors.items():
        writer.add_tensor(tensor_name, t.data, raw_dtype=None if t.data.dtype != np.uint8 else t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_request(out: Path, embeddings: str, tokenizer_gguf: Path | None, force: bool) -> None:
    """The command line, before the checkpoint is read."""
    if embeddings not in EMBEDDING_TYPES:
        raise ValueError(f"--embeddings={embeddings!r} is not allowed; choose one of {', '.join(EMBEDDING_TYPES)}")
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file path such as model.gguf")
    if out.exists() and not force:
        raise ValueError(f"--out {str(out)!r} exists; pass --force to replace it")
    if tokenizer_gguf is not None:
        if not tokenizer_gguf.is_file():
            raise ValueError(f"--tokenizer-gguf {str(tokenizer_gguf)!r} does not exist")
        with open(tokenizer_gguf, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"--tokenizer-gguf {str(tokenizer_gguf)!r} is not a GGUF file")


def export_gguf(ckpt: str | Path, out: str | Path, embeddings: str = "q8_0", tokenizer_gguf: str | Path | None = None, force: bool = False) -> dict[str, int]:
    """Write the checkpoint `ckpt` as the GGUF file `out` (written beside it, then renamed).
    Returns how many tensors of each type were written. Bad input: a one-line ValueError."""
    from qat.train.checkpoint import checkpoint_file, load_trained
    from qat.train.lifecycle import quantization_metadata

    out, ckpt = Path(out), Path(ckpt)
    tokenizer_gguf = None if tokenizer_gguf is None else Path(tokenizer_gguf)
    check_request(out, embeddings, tokenizer_gguf, force)
    checkpoint_file(ckpt)  # before the (slow) load
    gguf = require_gguf()
    net, tokenizer, config, step = load_trained(ckpt)
    check_exportable(net, embeddings)
    vocab_size = net.cfg.vocab_size
    entries = copied_tokenizer(tokenizer_gguf, vocab_size) if tokenizer_gguf else converted_tokenizer(gguf, tokenizer, vocab_size).entries(gguf)
    tensors = model_tensors(gguf, net, embeddings)
    model = config.get("model", {})
    name = f"{model.get('size', 'llama')}-{config.get('quant', {}).get('name', 'qat')}"
    meta = quantization_metadata(net)  # the main configs; the tensor types say each layer's bits
    provenance = {"weight": meta["weight"], "activation": meta["activation"], "excluded": meta["excluded"], "step": step, "embeddings": embeddings}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_gguf(tmp, net, tensors, entries, name, provenance)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if out.exists() and not force:  # again: it may have appeared while we wrote
            raise ValueError(f"--out {str(out)!r} exists; pass --force to replace it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return counts
