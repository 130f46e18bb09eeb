"""Training's linears, norms and embeddings as GGUF tensors (what gguf_export.py writes).

Each quantized linear becomes Q4_0, Q4_1 or Q8_0 blocks built from the codes, scales and offsets
of its own weight quantizer (`fake_quantize`), never re-quantized from floats. That needs a config
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qat.quant.engine_limits import weight_only_problems
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize

BLOCK = 32  # Q4_0 / Q4_1 / Q8_0 block: consecutive weights along the input dim sharing one d


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
    q = fake_quantize(weight, wq.cfg, wq.grid, wq.scale_to_export(weight, f"layer {name}"))
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
