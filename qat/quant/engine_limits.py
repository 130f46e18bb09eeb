"""What a serving engine that computes 16-bit activations and applies no online rotation
(llama.cpp, vLLM's weight-only kernels) cannot reproduce of a QuantLinear: the checks the GGUF
and compressed-tensors exporters share. Each exporter adds its format's own grid, bits and
group rules."""

from __future__ import annotations

import torch

from qat.quant.linear import QuantLinear


def weight_only_problems(layer: QuantLinear, engine: str) -> list[str]:
    """One phrase per setting `engine` cannot compute as training did (empty: none). The weight
    quantizer is assumed enabled; its float16 step, float32 latent and no bias are what makes
    the stored integer-times-step values exact."""
    w, a = layer.weight_quantizer.cfg, layer.input_quantizer.cfg
    problems = []
    if a.enabled:
        problems.append(f"activation bits={a.bits:g} ({engine} computes 16-bit activations; need 16)")
    for side, cfg in (("weight", w), ("activation", a)):
        if cfg.rotation != "none":
            problems.append(f"{side} rotation={cfg.rotation!r} ({engine} applies no rotation; need 'none')")
    if w.sparsity != "none":
        problems.append(f"weight sparsity={w.sparsity!r} (need 'none')")
    if w.scale_dtype != "float16":
        problems.append(f"weight scale_dtype={w.scale_dtype!r} (the file stores the step as float16: need 'float16')")
    if w.learnable_scale:
        problems.append("weight scale='lsq' (a learned scale is not one step per group)")
    if layer.weight.dtype not in (torch.float32, torch.float64):
        problems.append(f"weight dtype {layer.weight.dtype} (integer times step is exact in float32; need float32)")
    if layer.bias is not None:
        problems.append("a bias (the Llama has none)")
    return problems
