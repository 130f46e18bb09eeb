"""The packed model format, version 1: a trained low-bit Llama as integer codes plus scales.

A packed model is a directory:

    config.json         UTF-8 JSON: the model, every quantized layer's quantizers, the run
    model.safetensors   every tensor (safetensors: an 8-byte little-endian header length, a JSON
                        header of {name: {dtype, shape, data_offsets}} plus "__metadata__":
                        {"format_version": "1"}, then the raw little-endian C-order bytes)
    tokenizer.json      only for a Hugging Face tokenizer: its `tokenizers` file, byte for byte

config.json
-----------
    format_version  1 (an int; a reader refuses versions it does not know)
    model           the Llama's fields (models.LlamaConfig): vocab_size, n_layer, d_model,
                    n_head, n_kv_head, multiple_of, ffn_hidden, max_seq_len, rope_theta,
                    norm_eps, tie_embeddings, init_std, head_size (null = d_model / n_head),
                    rope_scaling (null, or the llama3 {factor, low_freq_factor,
                    high_freq_factor, original_max_seq_len})
    tokenizer       {"type": "bytes"}: ids 0..255 are UTF-8 bytes, 256 ends a document; or
                    {"type": "hf", "file": "tokenizer.json", "eos_token": "<|endoftext|>",
                    "bos_token": null or the token put before every encoded text (pretrained models)}
    layers          {layer name: entry} for every quantized linear (names as in the model,
                    e.g. "layers.0.attn.qkv"); an entry holds
        in_features K, out_features N, bias (true/false)
        weight, activation   the training quantizer configs: bits (1..8, 1.58 = ternary,
                    16 = not quantized), rotation ("none" | "hadamard"), hadamard_block
                    (an order b dividing K, see "Decoding a weight", or "full" = K), scale
                    ("rms_mse" | "absmax" | "mse_search" | "lsq"), grid ("int" | "int_zero"
                    | "gaussian" | "fp4"), estimator,
                    trust, clip_scale (training only), granularity ("row" or a group size g),
                    sparsity ("none" | "2:4"), backend (training only)
        weight_dtype   the dtype the latent weight was trained in ("float32", "bfloat16", ...)
        weight_grid, input_grid   null at 16 bits, else {"n_levels": n, "center": c or null,
                    "gaussian_scale": c(bits)}: center is set for the uniform grids (below);
                    gaussian_scale is the rms_mse fit's s / RMS
    trained         {"run_config": the training run's resolved config, "step": optimizer steps}

Tensors of a quantized layer P (N = out_features, K = in_features)
------------------------------------------------------------------
    P.weight_codes      uint8 [N, packed_bytes(Kc, bits)]  weight codes, each row packed on its
                        own at `bits` (qat/packed/packing.py documents the bit layout);
                        Kc = K, or K/2 with 2:4 sparsity (only the kept codes, in column order)
    P.weight_scale      float32 [N, G]  the scale s of each row (G = 1) or group of g columns
                        (G = K/g); a learned LSQ/PACT weight scale is stored once per row.
                        float64 when the model was exported in float64
    P.weight_levels     float64 [n]  the grid's unit levels, ascending; gaussian/fp4 grids only
    P.weight_positions  uint8 [N, packed_bytes(K/2, 2)]  2:4 only: for every group of 4
                        columns, the 2-bit in-group index (0..3) of each of its 2 kept entries,
                        ascending, packed like 2-bit codes; kept code j sits in column
                        4 * (j // 2) + position_j, every other column is exactly zero
    P.input_levels      float64 [n]  the activation grid's levels; gaussian/fp4 grids only
    P.input_scale       [] (a scalar)  the learned activation scale; scale = "lsq" only
    P.weight            [N, K] weight_dtype  instead of the four weight_* tensors when the
                        weight is 16-bit: the latent weight, NOT rotated
    P.bias              [N]  when bias is true
Every other tensor is the plain model's, under its own name and in its training dtype:
embed.weight [vocab, d], layers.{i}.attn_norm.weight [d], layers.{i}.mlp_norm.weight [d],
norm.weight [d], lm_head.weight [vocab, d] (absent when tie_embeddings: it is embed.weight),
and the weight of any linear that was not quantized.

Decoding a weight
-----------------
A code indexes the unit levels of its grid, 0 .. n_levels - 1 (config.json's
weight_grid.n_levels: 2**bits, 3 for ternary; int_zero uses 2c + 1 of them). With the scale s
of its row or group (column k is in group k // g):

    uniform grids   value = (code - c) * (s / c)
        "int":      c = (2**bits - 1) / 2   (2**bits evenly spaced levels spanning [-s, s],
                    no zero; ternary: c = 1, levels -s, 0, s)
        "int_zero": c = floor((2**bits - 1) / 2)   (2c + 1 levels with zero: -7..7 at 4 bits)
    gaussian, fp4   value = weight_levels[code] * s

The result is W_rot = W H, the weight in the ROTATED basis: with rotation "hadamard",
H = blockdiag(H_b / sqrt(b), ...) along K with b = hadamard_block; H = I with rotation "none".
For b a power of two, H_b is the Sylvester Hadamard matrix (H_1 = [1], H_2m = [[H_m, H_m],
[H_m, -H_m]]). Otherwise b = m * p with p the largest power of two such that H_m has a
construction, and H_b = H_m ⊗ H_p (Kronecker, H_p Sylvester): H_m is Paley II of
q = m/2 - 1 if that is a prime power = 1 mod 4, else Paley I of q = m - 1 (a prime power
= 3 mod 4), else H_a ⊗ H_(m/a) for the smallest such a; over GF(q) built from the first
irreducible polynomial. qat/quant/hadamard_orders.py states every choice (element order,
polynomial search, matrix layout); e.g. 1536 = H_12 (Paley II, q = 5) ⊗ H_128 and 11008 =
H_344 (Paley I, q = 343 = 7^3) ⊗ H_32. Paley I matrices are not symmetric: H^-1 = H^T.
Since H is orthogonal, y = x W^T = (x H) W_rot^T.

Running a layer
---------------
1. Rotate the input: x H (as above).
2. Quantize it per the activation config, row by row (or per group of g): the scale s is
   input_scale if present, else fitted in float32 (float64 for float64 inputs): rms_mse
   s = gaussian_scale * max(sqrt(mean(x^2)), 1e-12); absmax s = max|x|; mse_search: of
   s = r * max|x| (r = 1/100 .. 100/100) and the rms_mse s, the one with the least squared
   error. The code is the nearest level to x / s clipped to [-1, 1] (ties go up on uniform
   grids, down on gaussian/fp4). At 16 bits the rotated input is used as it is. With
   activation sparsity "2:4", the 2 smallest |x| of every 4 (after the rotation) become 0;
   the scale is fitted on the row before that.
3. y = x_q W_rot^T + bias.
With uniform grids on both sides, step 3 is integer arithmetic: code - c is an integer
(int_zero, ternary) or a half integer (int), so q = code - c or q = 2 (code - c) is an
integer, value = q * s / d with d = c or 2c, and y = sum_k q_x q_w * (s_x / d_x)(s_w / d_w),
the integer sum taken per group when either side has group scales.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from qat.quant.config import QuantizerConfig
from qat.quant.grids import Grid, make_grid

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# Tensor names inside a quantized layer (prefixed with the layer's name and a dot).
WEIGHT_CODES = "weight_codes"
WEIGHT_SCALE = "weight_scale"
WEIGHT_LEVELS = "weight_levels"
WEIGHT_POSITIONS = "weight_positions"
INPUT_LEVELS = "input_levels"
INPUT_SCALE = "input_scale"

POSITION_BITS = 2  # an index 0..3 inside a group of 4


def grid_entry(cfg: QuantizerConfig) -> dict[str, Any] | None:
    """config.json's description of a quantizer's grid (None at 16 bits)."""
    if not cfg.enabled:
        return None
    grid = make_grid(cfg.bits, cfg.grid)
    return {"n_levels": grid.size, "center": grid.center, "gaussian_scale": grid.gaussian_scale}


def levels_tensor(grid: Grid) -> torch.Tensor:
    """The unit levels in float64: the exact Python floats the training code rounds to."""
    return torch.tensor(grid.levels, dtype=torch.float64)


def stored_codes_per_row(in_features: int, cfg: QuantizerConfig) -> int:
    """Kc: how many weight codes a row stores (the kept half under 2:4)."""
    return in_features // 2 if cfg.sparsity == "2:4" else in_features


def scale_groups(in_features: int, cfg: QuantizerConfig) -> int:
    """G: how many scales a row has (1 per row, K/g per group)."""
    return 1 if cfg.granularity == "row" else in_features // cfg.granularity


def split_two_of_four(codes: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes [N, K] and the 2:4 keep mask -> (kept codes [N, K/2], positions [N, K/2]).

    Boolean indexing walks each row in column order, so the kept pair of every group comes
    out ascending, as the format specifies.
    """
    n, k = codes.shape
    in_group = torch.arange(4, device=codes.device).repeat(k // 4).expand(n, k)
    return codes[keep].view(n, k // 2), in_group[keep].view(n, k // 2)


def merge_two_of_four(kept: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse: (dense codes [N, K] with 0 at pruned columns, keep mask [N, K])."""
    n, half = kept.shape
    columns = 4 * (torch.arange(half, device=kept.device) // 2) + positions.long()  # [N, K/2]
    dense = torch.zeros((n, 2 * half), dtype=kept.dtype, device=kept.device).scatter_(1, columns, kept)
    keep = torch.zeros((n, 2 * half), dtype=torch.bool, device=kept.device).scatter_(1, columns, True)
    return dense, keep


def dequantize(codes: torch.Tensor, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Codes [N, K] and scales [N, G] -> values [N, K] in the scale's dtype.

    The same operations, in the same order, as the training quantizer's rounding
    (round_to_grid), so the values are bit-identical to the fake-quantized weight.
    """
    n, k = codes.shape
    s = scale.unsqueeze(-1)  # [N, G, 1]
    c = codes.reshape(n, s.shape[1], -1)  # [N, G, K/G]
    if grid.uniform:
        value = (c.to(scale.dtype) - grid.center) * (s / grid.center)
    else:
        value = levels_tensor(grid).to(device=scale.device, dtype=scale.dtype)[c.long()] * s
    return value.reshape(n, k)


class IntegerForm(NamedTuple):
    """How a uniform grid's codes become small integers: u = code_mul * code - code_shift
    fits int8, q = mul * u + offset is the exact integer the value is a multiple of, and
    value = q * (s / divisor)."""

    code_mul: int
    code_shift: int
    mul: int
    offset: int
    divisor: float


def integer_form(grid: Grid) -> IntegerForm:
    """The int8-compatible integer form of a uniform grid's codes.

    int_zero (and ternary int): c is an integer, q = code - c, |q| <= 127.
    int with n <= 128 levels: c = (n - 1) / 2, q = 2 code - (n - 1) is odd, |q| <= 127.
    int at 8 bits: q = 2 code - 255 reaches +-255, past int8; u = code - 128 in [-128, 127]
    and q = 2u + 1, so a matmul runs on u and adds row-sum corrections (see linear.py).
    """
    if not grid.uniform:
        raise ValueError(f"grid={grid.name!r} has no integer form; only the uniform grids 'int' and 'int_zero' do")
    c, n = grid.center, grid.size
    if float(c).is_integer():
        return IntegerForm(1, int(c), 1, 0, c)
    if n <= 128:
        return IntegerForm(2, n - 1, 1, 0, float(n - 1))
    return IntegerForm(1, n // 2, 2, 1, float(n - 1))


def to_int8(codes: torch.Tensor, form: IntegerForm) -> torch.Tensor:
    """Codes (any integer dtype) -> u = code_mul * code - code_shift as int8."""
    return (codes.to(torch.int16) * form.code_mul - form.code_shift).to(torch.int8)
