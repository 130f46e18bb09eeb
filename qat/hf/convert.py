"""Tensor names and layouts: Hugging Face Llama <-> our Llama.

Two differences, both exact (no arithmetic, only copies and row permutations):
  * q, k and v are separate matrices there and one fused `attn.qkv` = [q; k; v] here;
  * RoPE pairs: HF rotates (x[i], x[i + hd/2]) ("halves"), we rotate (x[2i], x[2i+1])
    ("interleaved"), with the same angle for pair i. Reordering the q and k rows of every
    head (HF row i -> our row 2i, HF row i + hd/2 -> our row 2i+1) makes our rotated q and
    k the HF ones with their dims permuted alike per head, and a dot product does not see
    a permutation applied to both operands: attention scores, and so the outputs, are equal.
v and every other tensor are copied as they are.
"""

from __future__ import annotations

import re

import torch

from qat.models.llama import LlamaConfig

# HF name inside model.layers.{i}. -> (our name inside layers.{i}., part of the fused qkv or None)
LAYER_KEYS = {
    "input_layernorm.weight": ("attn_norm.weight", None),
    "self_attn.q_proj.weight": ("attn.qkv.weight", "q"),
    "self_attn.k_proj.weight": ("attn.qkv.weight", "k"),
    "self_attn.v_proj.weight": ("attn.qkv.weight", "v"),
    "self_attn.o_proj.weight": ("attn.proj.weight", None),
    "post_attention_layernorm.weight": ("mlp_norm.weight", None),
    "mlp.gate_proj.weight": ("mlp.gate.weight", None),
    "mlp.up_proj.weight": ("mlp.up.weight", None),
    "mlp.down_proj.weight": ("mlp.down.weight", None),
}
GLOBAL_KEYS = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
# Older checkpoints store RoPE's inverse frequencies; they follow from the config, so we skip them.
DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def halves_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF q/k rows [n_heads * hd, d] -> ours: per head, row i -> 2i and row i + hd/2 -> 2i + 1."""
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def interleaved_to_halves(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of `halves_to_interleaved` (our q/k rows -> HF's)."""
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def qkv_rows(cfg: LlamaConfig) -> dict[str, tuple[int, int, int]]:
    """Where q, k and v sit in the fused qkv weight: part -> (first row, end row, heads)."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {"q": (0, q, cfg.n_head), "k": (q, q + kv, cfg.kv_heads), "v": (q + kv, q + 2 * kv, cfg.kv_heads)}


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of `cfg` must hold, with its shape (lm_head only if untied)."""
    d, hd, hidden = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    per_layer = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (cfg.n_head * hd, d),
        "self_attn.k_proj.weight": (cfg.kv_heads * hd, d),
        "self_attn.v_proj.weight": (cfg.kv_heads * hd, d),
        "self_attn.o_proj.weight": (d, cfg.n_head * hd),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (hidden, d),
        "mlp.up_proj.weight": (hidden, d),
        "mlp.down_proj.weight": (d, hidden),
    }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layer):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def our_target(hf_key: str) -> tuple[str, str | None] | None:
    """(our state-dict key, qkv part or None) for an HF tensor name; None for a derived buffer.
    Raises for a name that is neither (the caller names the file)."""
    if hf_key in GLOBAL_KEYS:
        return GLOBAL_KEYS[hf_key], None
    if DERIVED.fullmatch(hf_key):
        return None
    m = _LAYER.fullmatch(hf_key)
    if m and m.group(2) in LAYER_KEYS:
        ours, part = LAYER_KEYS[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", part
    raise ValueError(f"tensor {hf_key!r} is not part of a LlamaForCausalLM")


def to_ours(tensor: torch.Tensor, part: str | None, cfg: LlamaConfig) -> torch.Tensor:
    """An HF tensor in our layout (q and k rows permuted per head; everything else as is)."""
    if part in ("q", "k"):
        return halves_to_interleaved(tensor, qkv_rows(cfg)[part][2], cfg.head_dim)
    return tensor


def hf_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our plain Llama state dict (2-D weights in our layout) -> HF tensor names and layout.
    A tied lm_head is left out: transformers ties it to the embedding itself."""
    out = {hf: state[ours] for hf, ours in GLOBAL_KEYS.items() if not (hf == "lm_head.weight" and cfg.tie_embeddings)}
    rows = qkv_rows(cfg)
    for i in range(cfg.n_layer):
        for hf_suffix, (ours, part) in LAYER_KEYS.items():
            tensor = state[f"layers.{i}.{ours}"]
            if part is not None:
                start, end, heads = rows[part]
                tensor = tensor[start:end]
                if part != "v":
                    tensor = interleaved_to_halves(tensor, heads, cfg.head_dim)
            out[f"model.layers.{i}.{hf_suffix}"] = tensor.contiguous()
    return out
