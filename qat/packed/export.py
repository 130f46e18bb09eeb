"""Export a trained fake-quantized Llama as a packed model directory (format.py).

Every QuantLinear becomes the codes and scales its own weight quantizer produces
(`fake_quantize` of the weight, in the rotated basis), so the export is bit-for-bit what
was trained; everything else is copied in its training dtype. The directory is written
into a temp directory beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from qat.io import atomic_directory, atomic_write, check_output_dir
from qat.packed.format import (
    CONFIG_FILE,
    FORMAT_VERSION,
    INPUT_LEVELS,
    INPUT_SCALE,
    POSITION_BITS,
    TOKENIZER_FILE,
    WEIGHT_CODES,
    WEIGHT_LEVELS,
    WEIGHT_POSITIONS,
    WEIGHT_SCALE,
    WEIGHTS_FILE,
    grid_entry,
    levels_tensor,
    split_two_of_four,
)
from qat.packed.packing import pack_codes
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize, rotate
from qat.quant.sparsity import two_of_four_mask


@torch.no_grad()
def encode_layer(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
    """One QuantLinear's tensors, keyed by their suffix in the format (CPU, contiguous)."""
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    weight = layer.weight.detach()
    out: dict[str, torch.Tensor] = {}
    if wq.cfg.enabled:
        if wq.cfg.asymmetric:
            raise ValueError(f"layer {name}: weight asymmetric=true (an offset grid) is not in the packed format; export it with scripts/export_gguf.py (Q4_1) or scripts/export_hf.py")
        q = fake_quantize(weight, wq.cfg, wq.grid, wq.scale_to_export(weight, f"{name} weight"))
        codes = q.codes
        if wq.cfg.sparsity == "2:4":
            # The same mask fake_quantize applied: recomputed from the same rotated weight.
            codes, positions = split_two_of_four(codes, two_of_four_mask(rotate(weight, wq.cfg)))
            out[WEIGHT_POSITIONS] = pack_codes(positions, POSITION_BITS)
        out[WEIGHT_CODES] = pack_codes(codes, wq.cfg.bits)
        out[WEIGHT_SCALE] = q.scale.reshape(weight.shape[0], -1)  # [N, 1] or [N, K/g]
        if not wq.grid.uniform:
            out[WEIGHT_LEVELS] = levels_tensor(wq.grid)
    else:
        out["weight"] = weight
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    if aq.cfg.enabled and not aq.grid.uniform:
        out[INPUT_LEVELS] = levels_tensor(aq.grid)
    input_scale = aq.scale_to_export(torch.empty(0), f"{name} activation") if aq.cfg.learnable_scale else None
    if input_scale is not None:
        out[INPUT_SCALE] = input_scale
    return {k: v.cpu().contiguous() for k, v in out.items()}


def layer_entry(layer: QuantLinear) -> dict[str, Any]:
    """config.json's entry for one quantized layer."""
    w, a = layer.weight_quantizer.cfg, layer.input_quantizer.cfg
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "weight": w.to_dict(),
        "activation": a.to_dict(),
        "weight_dtype": str(layer.weight.dtype).removeprefix("torch."),
        "weight_grid": grid_entry(w),
        "input_grid": grid_entry(a),
    }


def tokenizer_entry(tokenizer: Any) -> dict[str, Any]:
    """config.json's tokenizer entry (the HF file itself is copied beside it)."""
    from qat.data.tokenizer import ByteTokenizer, HFTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return {"type": "bytes"}
    if isinstance(tokenizer, HFTokenizer):
        # bos_token: a pretrained model's begin-of-text token, put before every text it encodes.
        return {"type": "hf", "file": TOKENIZER_FILE, "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token}
    raise ValueError(f"tokenizer {type(tokenizer).__name__} is not allowed; export supports ByteTokenizer and HFTokenizer")


def packed_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the packed file: the quantized layers encoded, the rest as trained."""
    quantized = {name: m for name, m in net.named_modules() if isinstance(m, QuantLinear)}
    out = {
        key: value.detach().cpu().contiguous()
        for key, value in net.state_dict().items()
        if not any(key.startswith(f"{name}.") for name in quantized)
    }
    if net.cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # it is embed.weight; safetensors stores a tensor once
    for name, layer in quantized.items():
        out.update({f"{name}.{suffix}": t for suffix, t in encode_layer(name, layer).items()})
    return out


def packed_config(net: nn.Module, tokenizer: Any, run_config: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The config.json document."""
    return {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(net.cfg),
        "tokenizer": tokenizer_entry(tokenizer),
        "layers": {name: layer_entry(m) for name, m in net.named_modules() if isinstance(m, QuantLinear)},
        "trained": {"run_config": dict(run_config), "step": int(step)},
    }


def _check_net(net: nn.Module, tokenizer: Any) -> None:
    from qat.models.llama import LlamaConfig

    if not isinstance(getattr(net, "cfg", None), LlamaConfig):
        raise ValueError(f"net {type(net).__name__} is not allowed; export needs a models.Llama (with a LlamaConfig .cfg)")
    # A pretrained checkpoint may pad its embedding table past the tokenizer (never the reverse).
    if not isinstance(getattr(tokenizer, "vocab_size", None), int) or tokenizer.vocab_size > net.cfg.vocab_size:
        raise ValueError(f"tokenizer vocab_size={getattr(tokenizer, 'vocab_size', None)} exceeds the model's vocab_size={net.cfg.vocab_size}")


def export_packed(
    net: nn.Module, tokenizer: Any, run_config: Mapping[str, Any], step: int, out_dir: str | Path, force: bool = False
) -> Path:
    """Write `net` (a fake-quantized models.Llama) as a packed model directory; returns it."""
    out = Path(out_dir)
    check_output_dir(out, force)
    _check_net(net, tokenizer)
    config = packed_config(net, tokenizer, run_config, step)
    try:
        config_text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"run_config is not plain JSON ({err}); pass the resolved config as a dict") from None
    tensors = packed_tensors(net)
    with atomic_directory(out, force) as tmp:
        atomic_write(tmp / WEIGHTS_FILE, lambda f: f.write(safetensors_bytes(tensors, metadata={"format_version": str(FORMAT_VERSION)})))
        if config["tokenizer"]["type"] == "hf":
            atomic_write(tmp / TOKENIZER_FILE, lambda f: f.write(Path(tokenizer.path).read_bytes()))
        atomic_write(tmp / CONFIG_FILE, lambda f: f.write(config_text.encode()))
    return out


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Export a train.py checkpoint (what scripts/export.py runs). Any unreadable file is a
    one-line ValueError naming it."""
    from qat.train.checkpoint import checkpoint_file, load_trained  # Lightning/Hydra only for this entry point

    ckpt = Path(ckpt)
    check_output_dir(Path(out_dir), force)  # fail before the (slow) load
    checkpoint_file(ckpt)  # before the (slow) load
    try:
        model = load_trained(ckpt)
    except ValueError:
        raise
    except Exception as err:  # torch.load's many ways to fail on random bytes, text, truncation
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"checkpoint {str(ckpt)!r} cannot be read as a train.py checkpoint ({type(err).__name__}: {detail})") from None
    return export_packed(model.net, model.tokenizer, model.config, model.step, out_dir, force)
