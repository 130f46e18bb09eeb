"""Export a train.py checkpoint as a llama.cpp GGUF file (what scripts/export_gguf.py runs).

What llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs is then what was trained: each
quantized linear becomes Q4_0, Q4_1 or Q8_0 blocks built from the codes, scales and offsets of
its own weight quantizer (`fake_quantize`), never re-quantized from floats. That needs a config
those blocks hold exactly (quant=gguf_q4_0 / gguf_q4_1 / gguf_q8_0): weight-only (activations
16-bit), no rotation, one d per 32 consecutive inputs, d (and Q4_1's m) rounded to float16 in
every forward (scale_dtype=float16), and the grid of the type:

    Q4_0: grid int_zero at 4 bits, code c stands for (c - 7) * d: d as float16, then 16 bytes of
          nibbles q = (c - 7) + 8 in 1..15 (0, i.e. -8 d, is never used); byte j holds
          element j in its low and element j + 16 in its high nibble;
    Q4_1: grid int at 4 bits with asymmetric=true, code c in 0..15 stands for c * d + m: d and
          m as float16, then the nibbles q = c in Q4_0's order;
    Q8_0: grid int_zero at 8 bits, (c - 127) * d: d as float16, then 32 int8 q = c - 127.

Before a byte is written every tensor is decoded with `gguf.quants.dequantize` and must
equal training's quantized weight bit for bit (fp32). A 16-bit linear (a rule excluded it)
is stored F32, as the forward multiplies it; norms F32; the embedding and lm_head Q8_0
(re-quantized by gguf) or F16. q/k rows are stored as they are: llama.cpp's
convert_hf_to_gguf.py permutes Hugging Face's "halves" rows per head into the interleaved
RoPE layout, which is ours (qat/hf/convert.py `halves_to_interleaved` is that permutation).

The tokenizer is copied from a GGUF (`tokenizer_gguf`, every tokenizer.* key) or converted:
a byte-level BPE tokenizer.json (tokenizer.ggml.model "gpt2") or our ByteTokenizer.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qat.quant.engine_limits import weight_only_problems
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize

EMBEDDING_TYPES = ("q8_0", "f16")
BLOCK = 32  # Q4_0 / Q4_1 / Q8_0 block: consecutive weights along the input dim sharing one d
MAGIC = b"GGUF"
# Pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre), as tokenizer.json spells them.
GPT2_PRE = "gpt-2"  # ByteLevel(use_regex=True): GPT-2's own regex
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# llama.cpp refuses a "gpt2" vocabulary without merges and gguf cannot write an empty array: the
# byte tokenizer gets one merge that never fires (GPT-2's regex splits letters from digits).
BYTE_SENTINEL_MERGE = "a 1"


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ValueError(f"the Python package 'gguf' is missing ({err}); install it: pip install -e \".[gguf]\"") from None
    return gguf


# ---------------------------------------------------------------- what GGUF can hold


def layer_problems(layer: nn.Module) -> list[str]:
    """Why llama.cpp cannot compute this linear exactly as training did (empty: it can)."""
    if not isinstance(layer, QuantLinear):
        return [] if layer.bias is None else ["a bias (the Llama has none)"]
    w = layer.weight_quantizer.cfg
    if not w.enabled:  # a 16-bit weight is stored F32; only the input side can be wrong
        return [p for p in weight_only_problems(layer, "llama.cpp") if not p.startswith(("weight scale_dtype", "weight dtype"))]
    problems = weight_only_problems(layer, "llama.cpp")
    if w.asymmetric and w.bits != 4:
        problems.append(f"weight bits={w.bits:g} with asymmetric=true (Q4_1: need 4)")
    if not w.asymmetric and w.bits not in (4, 8):
        problems.append(f"weight bits={w.bits:g} (Q4_0 / Q8_0: need 4 or 8)")
    if not w.asymmetric and w.grid != "int_zero":
        problems.append(f"weight grid={w.grid!r} (Q4_0 / Q8_0 levels are k*d: need 'int_zero', or Q4_1's grid 'int' with asymmetric=true)")
    if w.granularity != BLOCK:
        problems.append(f"weight granularity={w.granularity!r} (one d per {BLOCK} weights: need {BLOCK})")
    if layer.in_features % BLOCK:
        problems.append(f"in_features={layer.in_features} (not a multiple of {BLOCK})")
    return problems


def check_exportable(net: nn.Module, embeddings: str) -> None:
    """Every bad setting as one ValueError line, before any tensor is built."""
    cfg = net.cfg
    bad = {f"layers.{i}.{name}": p for i, block in enumerate(net.layers) for name, m in linear_modules(block).items() if (p := layer_problems(m))}
    if bad:
        name, problems = next(iter(bad.items()))
        more = f" ({len(bad)} of {5 * cfg.n_layer} linears affected)"
        raise ValueError(
            f"layer {name}: {'; '.join(problems)}{more}; Q4_0 / Q4_1 / Q8_0 hold what quant=gguf_q4_0, gguf_q4_1 or gguf_q8_0 trains"
        )
    if isinstance(net.lm_head, QuantLinear):
        raise ValueError(f"layer lm_head is quantized; export_gguf writes the output head as --embeddings {embeddings} only")
    if embeddings == "q8_0" and cfg.d_model % BLOCK:
        raise ValueError(f"--embeddings q8_0 needs d_model divisible by {BLOCK} (d_model={cfg.d_model}); use --embeddings f16")


def linear_modules(block: nn.Module) -> dict[str, nn.Module]:
    return {"attn.qkv": block.attn.qkv, "attn.proj": block.attn.proj, "mlp.gate": block.mlp.gate, "mlp.up": block.mlp.up, "mlp.down": block.mlp.down}


# ---------------------------------------------------------------- tensors


@dataclass
class Tensor:
    """One GGUF tensor: numpy data (uint8 blocks for a quantized type) and its GGML type."""

    data: np.ndarray
    qtype: Any  # gguf.GGMLQuantizationType


def block_type(gguf: Any, cfg: Any) -> Any:
    """The GGML type of an exportable weight quantizer's blocks."""
    Q = gguf.GGMLQuantizationType
    return Q.Q4_1 if cfg.asymmetric else Q.Q4_0 if cfg.bits == 4 else Q.Q8_0


def _float16_bytes(values: torch.Tensor, what: str) -> np.ndarray:
    """[N, G] float32 values that must be float16 numbers, as little-endian bytes [N, G, 2]."""
    half = values.to(torch.float16)
    if not torch.equal(half.to(values.dtype), values):
        raise RuntimeError(f"a block's {what} is not a float16 number: the layer was not trained with scale_dtype=float16")
    return half.numpy()[..., None].view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[N, G, 32] integers in 0..15 as 16 bytes per block: j low, j + 16 high."""
    q = q.astype(np.uint8)
    return q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << np.uint8(4))


def blocks_from_codes(codes: torch.Tensor, scale: torch.Tensor, center: float, qtype_name: str, offset: torch.Tensor | None = None) -> np.ndarray:
    """Q4_0 / Q4_1 / Q8_0 blocks of a [N, K] code matrix with scales s [N, K/32, 1] (and Q4_1's
    offsets m): uint8 [N, K/32 * bytes per block]."""
    n, k = codes.shape
    d = scale.reshape(n, k // BLOCK) / center  # exact: the step was rounded to float16 in training
    blocks = codes.reshape(n, k // BLOCK, BLOCK).numpy()
    if qtype_name == "Q4_1":
        parts = [_float16_bytes(d, "step d"), _float16_bytes(offset.reshape(n, k // BLOCK), "offset m"), _nibbles(blocks)]
    elif qtype_name == "Q4_0":
        parts = [_float16_bytes(d, "step d"), _nibbles(blocks - int(center) + 8)]  # 1..15
    else:
        parts = [_float16_bytes(d, "step d"), (blocks - int(center)).astype(np.int8).view(np.uint8)]
    return np.concatenate(parts, axis=-1).reshape(n, -1)


@torch.no_grad()
def linear_tensor(gguf: Any, name: str, layer: nn.Module) -> Tensor:
    """A block linear as llama.cpp will multiply it, checked bit for bit against training."""
    weight = layer.weight.detach().cpu()
    if not isinstance(layer, QuantLinear) or not layer.weight_quantizer.cfg.enabled:
        return Tensor(weight.float().numpy(), gguf.GGMLQuantizationType.F32)  # the forward multiplies it as is
    wq = layer.weight_quantizer
    q = fake_quantize(weight, wq.cfg, wq.grid)
    if not torch.isfinite(q.value).all():
        raise ValueError(f"layer {name}: training's quantized weight has non-finite entries (a group whose float16 step is 0 or inf)")
    qtype = block_type(gguf, wq.cfg)
    blocks = blocks_from_codes(q.codes, q.scale, wq.grid.center, qtype.name, q.offset)
    decoded = gguf.quants.dequantize(blocks, qtype)
    trained = np.ascontiguousarray(q.value.float().numpy())
    if decoded.shape != trained.shape or not np.array_equal(decoded.view(np.uint32), trained.view(np.uint32)):
        wrong = int((decoded != trained).sum()) if decoded.shape == trained.shape else -1
        raise RuntimeError(f"layer {name}: the {qtype.name} blocks decode to other values than training's weight ({wrong} entries differ)")
    return Tensor(blocks, qtype)


def embedding_tensor(gguf: Any, weight: torch.Tensor, embeddings: str) -> Tensor:
    w = weight.detach().cpu().float().numpy()
    if embeddings == "f16":
        return Tensor(w.astype(np.float16), gguf.GGMLQuantizationType.F16)
    q8 = gguf.GGMLQuantizationType.Q8_0
    return Tensor(gguf.quants.quantize(w, q8), q8)


def rope_freq_factors(cfg: Any) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for Llama 3.1 scaling: the factor each frequency is divided by."""
    from qat.models.rope import rope_frequencies

    plain, scaled = rope_frequencies(cfg.head_dim, cfg.rope_theta), rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return (plain / scaled).to(torch.float32).numpy()


def model_tensors(gguf: Any, net: nn.Module, embeddings: str) -> dict[str, Tensor]:
    """Every tensor under its llama.cpp name, the fused qkv split into attn_q / attn_k / attn_v."""
    from qat.hf.convert import qkv_rows

    T, names, cfg = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES, net.cfg
    f32 = gguf.GGMLQuantizationType.F32

    def norm(module: nn.Module) -> Tensor:
        return Tensor(module.weight.detach().cpu().float().numpy(), f32)

    out = {f"{names[T.TOKEN_EMBD]}.weight": embedding_tensor(gguf, net.embed.weight, embeddings)}
    if cfg.rope_scaling is not None:
        out[f"{names[T.ROPE_FREQS]}.weight"] = Tensor(rope_freq_factors(cfg), f32)
    per_layer = {"attn.proj": T.ATTN_OUT, "mlp.gate": T.FFN_GATE, "mlp.up": T.FFN_UP, "mlp.down": T.FFN_DOWN}
    for i, block in enumerate(net.layers):
        name = lambda t: f"{names[t].format(bid=i)}.weight"  # noqa: E731
        out[name(T.ATTN_NORM)] = norm(block.attn_norm)
        qkv = linear_tensor(gguf, f"layers.{i}.attn.qkv", block.attn.qkv)
        for part, t in (("q", T.ATTN_Q), ("k", T.ATTN_K), ("v", T.ATTN_V)):
            start, end, _ = qkv_rows(cfg)[part]  # each row's blocks are its own: rows split cleanly
            out[name(t)] = Tensor(np.ascontiguousarray(qkv.data[start:end]), qkv.qtype)
        for ours, t in per_layer.items():
            out[name(t)] = linear_tensor(gguf, f"layers.{i}.{ours}", linear_modules(block)[ours])
        out[name(T.FFN_NORM)] = norm(block.mlp_norm)
    out[f"{names[T.OUTPUT_NORM]}.weight"] = norm(net.norm)
    if not cfg.tie_embeddings:  # llama.cpp reuses token_embd when output is absent
        out[f"{names[T.OUTPUT]}.weight"] = embedding_tensor(gguf, net.lm_head.weight, embeddings)
    return out


# ---------------------------------------------------------------- tokenizer metadata


def gguf_field(field: Any) -> tuple[Any, Any, Any]:
    """(value, type, array element type or None) of a GGUFReader field, strings as raw bytes."""
    from gguf import GGUFValueType as V

    main = V(int(field.types[0]))
    if main == V.ARRAY:
        if len(field.types) != 2:
            raise ValueError(f"metadata key {field.name!r} is a nested array, which export_gguf cannot copy")
        sub = V(int(field.types[1]))
        if sub == V.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return [v for i in field.data for v in field.parts[i].tolist()], main, sub
    if main == V.STRING:
        return bytes(field.parts[field.data[0]]), main, None
    return field.parts[field.data[0]].tolist()[0], main, None


def copied_tokenizer(path: Path, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """Every tokenizer.* key of the GGUF `path`, for a model with `vocab_size` rows."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf raises ValueError, struct.error, ... for a torn file
        raise ValueError(f"--tokenizer-gguf {str(path)!r} is not a readable GGUF file ({type(err).__name__})") from None
    entries = [(name, *gguf_field(f)) for name, f in reader.fields.items() if name.startswith("tokenizer.")]
    tokens = next((e[1] for e in entries if e[0] == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ValueError(f"--tokenizer-gguf {str(path)!r} holds no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens) != vocab_size:
        raise ValueError(f"--tokenizer-gguf {str(path)!r} has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    return [e for e in entries if not (isinstance(e[1], list) and not e[1])]  # gguf cannot write an empty array


@dataclass
class Vocabulary:
    """A converted tokenizer in llama.cpp's terms (tokenizer.ggml.*)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    eos_id: int
    bos_id: int | None

    def entries(self, gguf: Any) -> list[tuple[str, Any, Any, Any]]:
        K, V = gguf.Keys.Tokenizer, gguf.GGUFValueType
        out = [
            (K.MODEL, "gpt2", V.STRING, None),
            (K.PRE, self.pre, V.STRING, None),
            (K.LIST, self.tokens, V.ARRAY, V.STRING),
            (K.TOKEN_TYPE, self.types, V.ARRAY, V.INT32),
            (K.MERGES, self.merges, V.ARRAY, V.STRING),
            (K.EOS_ID, self.eos_id, V.UINT32, None),
            (K.ADD_BOS, self.bos_id is not None, V.BOOL, None),
            (K.ADD_EOS, False, V.BOOL, None),
        ]
        return out + ([(K.BOS_ID, self.bos_id, V.UINT32, None)] if self.bos_id is not None else [])


def _pre_tokenizer(spec: dict | None, where: str) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (tokenizer.ggml.pre)."""
    parts = [] if spec is None else spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return GPT2_PRE
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX and not parts[1].get("use_regex", True):
        return "llama-bpe"
    raise ValueError(f"{where}: pre-tokenizer {kinds} is not one llama.cpp names (GPT-2's or Llama 3's byte-level regex); pass --tokenizer-gguf with a GGUF of the same tokenizer")


def byte_level_char(b: int) -> str:
    """GPT-2's byte-level spelling of byte b: itself if printable, else chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return chr(b) if b in printable else chr(256 + [c for c in range(256) if c not in printable].index(b))


def _gguf_types(gguf: Any) -> tuple[int, int, int, int]:
    t = gguf.TokenType
    return int(t.NORMAL), int(t.CONTROL), int(t.USER_DEFINED), int(t.UNUSED)


def converted_tokenizer(gguf: Any, tokenizer: Any, vocab_size: int) -> Vocabulary:
    """Our ByteTokenizer, or a byte-level BPE tokenizers JSON file, as a "gpt2" vocabulary."""
    from qat.data.tokenizer import ByteTokenizer, HFTokenizer
    from qat.hf.tokenizer import BYTE_EOS_TOKEN

    normal, control, user, unused = _gguf_types(gguf)
    if isinstance(tokenizer, ByteTokenizer):
        tokens = [byte_level_char(b) for b in range(256)] + [BYTE_EOS_TOKEN]  # id b = byte b
        vocab = Vocabulary(tokens, [normal] * 256 + [control], [BYTE_SENTINEL_MERGE], GPT2_PRE, tokenizer.eos_id, None)
    elif isinstance(tokenizer, HFTokenizer):
        where = f"tokenizer {tokenizer.path!r}"
        spec = json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
        model = spec.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{where} is not a byte-level BPE (model {model.get('type')!r}); pass --tokenizer-gguf with a GGUF of the same tokenizer")
        if spec.get("normalizer") is not None:
            raise ValueError(f"{where} has a normalizer, which llama.cpp's BPE does not apply; pass --tokenizer-gguf")
        from tokenizers import Tokenizer

        ids = {i: t for t, i in Tokenizer.from_file(tokenizer.path).get_vocab(with_added_tokens=True).items()}
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(f"{where}: token ids are not 0..{len(ids) - 1} without gaps")
        added = {a["id"]: control if a.get("special") else user for a in spec.get("added_tokens", [])}
        tokens, types = [ids[i] for i in range(len(ids))], [added.get(i, normal) for i in range(len(ids))]
        # Merges as "a b"; the list-of-pairs form may hold spaces, which gguf spells U+0120 (as llama.cpp reads them).
        merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m) for m in model.get("merges", [])]
        pre = _pre_tokenizer(spec.get("pre_tokenizer"), where) if merges else GPT2_PRE  # no merges: any split gives the bytes
        vocab = Vocabulary(tokens, types, merges or [BYTE_SENTINEL_MERGE], pre, tokenizer.eos_id, tokenizer.bos_id)
    else:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} cannot be converted (ByteTokenizer or a byte-level BPE tokenizer.json can); pass --tokenizer-gguf")
    if len(vocab.tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is {vocab_size}")
    pad = vocab_size - len(vocab.tokens)  # embedding rows past the tokenizer: llama.cpp needs a token each
    vocab.tokens += [f"[PAD{i}]" for i in range(len(vocab.tokens), vocab_size)]
    vocab.types += [unused] * pad
    return vocab


# ---------------------------------------------------------------- the file


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
    from qat.train.checkpoint import load_trained
    from qat.train.lifecycle import quantization_metadata

    out, ckpt = Path(out), Path(ckpt)
    tokenizer_gguf = None if tokenizer_gguf is None else Path(tokenizer_gguf)
    check_request(out, embeddings, tokenizer_gguf, force)
    if not ckpt.is_file():
        raise ValueError(f"checkpoint {str(ckpt)!r} does not exist (expected RUN/checkpoints/last.ckpt)")
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
