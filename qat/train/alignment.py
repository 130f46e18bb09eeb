"""Gradient alignment: how well the gradient through the quantized model points where the
full-precision gradient points, at the same weights and on the same batch.

    g_q  = d loss / d W of each quantized layer's latent weight, quantizers on (the estimator's
           backward: trust, STE, ...)
    g_fp = the same gradient with every quantizer off (a plain full-precision forward/backward)

Per layer: cos(g_q, g_fp), the norm ratio |g_q| / |g_fp|, and the share of weight elements
whose gradient the estimator passes (the trust mask). Means over layers are reported too.
This is the quantity the trust estimator is built to improve (QuEST, section 4).

Cost: two extra forward/backward passes of one batch (eager, no optimizer involvement).
Nothing the training step owns is touched: gradients are taken with torch.autograd.grad
(the .grad buffers stay as they are), weights and RNG state are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize


def quantized_layers(net: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in net.named_modules() if isinstance(m, QuantLinear)}


@contextlib.contextmanager
def quantizers_off(net: nn.Module) -> Iterator[None]:
    """Every QuantLinear computes the plain x W^T + b while inside (instance-level forward)."""
    layers = quantized_layers(net).values()
    for layer in layers:
        layer.forward = lambda x, layer=layer: F.linear(x, layer.weight, layer.bias)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = net.forward(x)  # the module's own forward: bypasses a compiled __call__
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _weight_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.enable_grad():
        return list(torch.autograd.grad(_loss(net, x, y), weights))


def gradient_alignment(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    """{layer name: {cos, norm_ratio, mask_fraction}} for every quantized layer of `net`."""
    layers = quantized_layers(net)
    weights = [layer.weight for layer in layers.values()]
    rng = torch.get_rng_state()
    g_q = _weight_grads(net, x, y, weights)
    with quantizers_off(net):
        g_fp = _weight_grads(net, x, y, weights)
    torch.set_rng_state(rng)
    out = {}
    for (name, layer), gq, gf in zip(layers.items(), g_q, g_fp):
        gq, gf = gq.double().flatten(), gf.double().flatten()
        norm_q, norm_fp = gq.norm(), gf.norm()
        with torch.no_grad():
            quantizer = layer.weight_quantizer
            passed = fake_quantize(layer.weight, quantizer.cfg, quantizer.grid, quantizer.held_scale(layer.weight)).grad_mask
        out[name] = {
            "cos": float(gq @ gf / (norm_q * norm_fp).clamp_min(1e-300)),
            "norm_ratio": float(norm_q / norm_fp.clamp_min(1e-300)),
            "mask_fraction": float(passed.float().mean()),
        }
    return out


def alignment_metrics(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    """align/<layer>/<stat> and align/mean_<stat>, for the loggers."""
    metrics = {f"align/{name}/{key}": value for name, values in stats.items() for key, value in values.items()}
    for key in ("cos", "norm_ratio", "mask_fraction"):
        values = [v[key] for v in stats.values()]
        if values:
            metrics[f"align/mean_{key}"] = sum(values) / len(values)
    return metrics
