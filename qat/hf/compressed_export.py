"""Export a weight-only QAT checkpoint in the compressed-tensors format ("pack-quantized"), the
format vLLM and SGLang serve, and that transformers loads with the `compressed-tensors` package.

The directory is a Hugging Face Llama directory (qat/hf/export.py writes the config, tokenizer
and 16-bit tensors) in which every block linear holds, instead of `weight`:
  weight_packed  int32 [N, ceil(K * bits / 32)]: the signed codes k, offset by 2^(bits-1) and
                 packed densely by compressed-tensors' own `pack_to_int32`;
  weight_scale   [N, K / group] (or [N, 1] per channel): the step d, so the weight is k * d;
  weight_shape   [N, K].
Training's levels are k * d with |k| <= 2^(bits-1) - 1 (grid int_zero) and d rounded to float16
(scale_dtype float16), so the file holds them exactly: the exporter unpacks every layer and checks
k * d against training's quantized weight bit for bit. Symmetric int4 / int8 in
compressed-tensors also allows k = -2^(bits-1), which training never uses. Activations stay
16-bit (W4A16 / W8A16), as vLLM computes them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qat.hf.convert import hf_state_dict
from qat.hf.export import plain_state, write_hf_dir
from qat.io import atomic_directory, check_output_dir
from qat.quant.engine_limits import weight_only_problems
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize

FORMAT = "pack-quantized"
BITS = (4, 8)
HF_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def require_compressed_tensors() -> Any:
    if importlib.util.find_spec("compressed_tensors") is None:
        raise ValueError('the compressed-tensors package is not installed; pip install -e ".[compressed]"')
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    return pack_to_int32, unpack_from_int32


def layer_problems(layer: nn.Module) -> list[str]:
    """Why a block linear cannot be stored as symmetric pack-quantized weights (empty: it can)."""
    if not isinstance(layer, QuantLinear) or not layer.weight_quantizer.cfg.enabled:
        return ["an unquantized weight (every block linear must be quantized: quant=ct_w4a16_g128 or ct_w8a16)"]
    w = layer.weight_quantizer.cfg
    problems = weight_only_problems(layer, "vLLM")
    if w.bits not in BITS:
        problems.append(f"weight bits={w.bits:g} (need 4 or 8)")
    if w.grid != "int_zero":
        problems.append(f"weight grid={w.grid!r} (symmetric integer levels k*d: need 'int_zero')")
    if w.asymmetric:
        problems.append("weight asymmetric=true (the presets here are symmetric: need false)")
    return problems


def block_linears(net: nn.Module) -> dict[str, nn.Module]:
    from qat.train.lifecycle import block_linears as swappable  # Lightning only for this entry point

    return swappable(net)


def check_exportable(net: nn.Module) -> dict[str, Any]:
    """One ValueError line for the first bad layer; else the one weight config every layer shares."""
    layers = block_linears(net)
    for name, layer in layers.items():
        if problems := layer_problems(layer):
            raise ValueError(f"layer {name}: {'; '.join(problems)}; compressed-tensors W4A16 / W8A16 hold what quant=ct_w4a16_g128 or quant=ct_w8a16 trains")
    configs = {(q.weight_quantizer.cfg.bits, q.weight_quantizer.cfg.granularity) for q in layers.values()}
    if len(configs) > 1:
        raise ValueError(f"the block linears use {len(configs)} weight settings (bits, granularity) {sorted(configs, key=str)}; one compressed-tensors group needs one")
    if isinstance(net.lm_head, QuantLinear):
        raise ValueError("layer lm_head is quantized; the output head is written in 16 bits only")
    bits, granularity = configs.pop()
    return {"bits": int(bits), "group": None if granularity == "row" else int(granularity)}


@torch.no_grad()
def codes_and_steps(net: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every block linear's signed codes k (int8 [N, K]) and steps d (float32 [N, groups]), under
    their Hugging Face names (`...q_proj`), rows in Hugging Face's order."""
    codes, steps = {}, {}
    for name, layer in block_linears(net).items():
        q = layer.weight_quantizer
        quantized = fake_quantize(layer.weight.detach(), q.cfg, q.grid, q.scale_to_export(layer.weight.detach(), name))
        center = q.grid.center
        codes[name] = (quantized.codes - int(center)).to(torch.int8)
        steps[name] = (quantized.scale.reshape(layer.weight.shape[0], -1) / center).float()
    base = plain_state(net, "latent")
    return _hf_layout(base, codes, net.cfg), _hf_layout(base, steps, net.cfg)


def _hf_layout(base: dict[str, torch.Tensor], per_layer: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    # hf_state_dict moves whole rows (the qkv split, the RoPE row order); a [N, anything] tensor
    # in place of a weight comes out in the weight's Hugging Face row order.
    hf = hf_state_dict({**base, **{f"{name}.weight": t for name, t in per_layer.items()}}, cfg)
    return {key.removesuffix(".weight"): t for key, t in hf.items() if key.split(".")[-2] in HF_LINEARS}


def compressed_tensors(dense: dict[str, torch.Tensor], codes: dict[str, torch.Tensor], steps: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """`dense` (the Hugging Face tensors, quantized weights as training multiplies them) with every
    block linear's weight replaced by its packed codes and steps; checked exact on the way."""
    pack, unpack = require_compressed_tensors()
    out = dict(dense)
    for name, k in codes.items():
        weight = out.pop(f"{name}.weight")
        d = steps[name]
        if not torch.equal(d.half().float(), d):
            raise RuntimeError(f"{name}: a step d is not a float16 number: the layer was not trained with scale_dtype=float16")
        packed = pack(k, bits)
        if not torch.equal(unpack(packed, bits, torch.Size(k.shape)), k):
            raise RuntimeError(f"{name}: compressed-tensors' packing does not round-trip the codes")
        decoded = (k.float().reshape(k.shape[0], d.shape[1], -1) * d[..., None]).reshape(k.shape)
        if not torch.equal(decoded.view(torch.int32), weight.float().contiguous().view(torch.int32)):
            raise RuntimeError(f"{name}: k * d differs from training's quantized weight in {int((decoded != weight).sum())} entries")
        out[f"{name}.weight_packed"] = packed
        out[f"{name}.weight_scale"] = d.to(weight.dtype).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor(list(k.shape), dtype=torch.int64)
    return out


def quantization_config(bits: int, group: int | None) -> dict[str, Any]:
    """config.json's `quantization_config`: one group of symmetric int weights, 16-bit activations."""
    from compressed_tensors import __version__

    weights = {
        "num_bits": bits, "type": "int", "symmetric": True, "dynamic": False, "actorder": None, "observer": "minmax",
        "strategy": "group" if group else "channel", "group_size": group, "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed", "version": __version__,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None, "format": FORMAT}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
    }


def export_compressed(ckpt: str | Path, out_dir: str | Path, force: bool = False) -> dict[str, Any]:
    """What scripts/export_compressed.py runs; returns {"bits", "group", "layers"}. Bad input is
    one ValueError line, raised before anything is written; the directory appears when complete."""
    from qat.train.checkpoint import checkpoint_file, load_trained

    out, ckpt = Path(out_dir), Path(ckpt)
    check_output_dir(out, force)
    require_compressed_tensors()
    checkpoint_file(ckpt)  # before the (slow) load
    model = load_trained(ckpt)
    scheme = check_exportable(model.net)
    codes, steps = codes_and_steps(model.net)
    with atomic_directory(out, force) as tmp:
        write_hf_dir(model.net, model.tokenizer, model.config, model.step, tmp, "quantized", "float32")
        dense = load_file(str(tmp / "model.safetensors"))
        save_file(compressed_tensors(dense, codes, steps, scheme["bits"]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = quantization_config(scheme["bits"], scheme["group"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
    return {**scheme, "layers": len(codes)}
