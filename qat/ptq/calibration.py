"""GPTQ over a whole quantized Llama, one transformer block at a time.

The calibration batches enter block 0 as embeddings; each block's quantized linears collect
the Hessian of their real left operand (the rotated, quantized input the layer multiplies),
are rounded by GPTQ, and the block's outputs WITH its new weights become the next block's
inputs, so later blocks compensate for the errors of the earlier ones (GPTQ's sequential
mode at block granularity). Costs about two forward passes over the calibration tokens,
plus one GPTQ sweep per linear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

from qat.quant.gptq import GPTQResult, gptq, gptq_unsupported_reason
from qat.quant.hadamard import hadamard_transform
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize, rotate


class LayerReport(NamedTuple):
    name: str
    code_agreement: float  # share of the forward's codes equal to GPTQ's
    output_error_rtn: float  # ||X'(W_rtn - W)^T||^2 / ||X'W^T||^2 on the calibration inputs
    output_error_gptq: float


def unrotate(w: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """The latent weight whose rotation is w (H^T undoes the orthogonal rotation)."""
    cfg = layer.weight_quantizer.cfg
    return hadamard_transform(w, cfg.hadamard_block, inverse=True) if cfg.rotation == "hadamard" else w


class _HessianHook:
    """Accumulates X'^T X' of a layer's quantized input (fp64) over the calibration batches."""

    def __init__(self, dim: int, device: torch.device):
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.rows = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = output.detach().reshape(-1, output.shape[-1]).to(torch.float64)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2.0 * self.sum / max(self.rows, 1)


def _relative_output_error(hessian: torch.Tensor, reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """E||x'(Wq - W)^T||^2 / E||x'W^T||^2 from the Hessian alone (rotated basis, fp64)."""
    diff = quantized.double() - reference.double()
    return float(torch.einsum("nk,kl,nl->", diff, hessian, diff) / torch.einsum("nk,kl,nl->", reference.double(), hessian, reference.double()))


@torch.no_grad()
def pin_codes(layer: QuantLinear, result: GPTQResult, rounds: int = 8) -> None:
    """With a stored scale, make the forward's codes GPTQ's exactly. The latent is stored in the
    weight's dtype (and unrotated), so a value on a rounding boundary may round the other way;
    such entries take the level GPTQ chose, which rounds to its own code. Setting them moves the
    others by a float rounding, so repeat until none differs."""
    for _ in range(rounds):
        wrong = layer.weight_quantizer.quantize(layer.weight.detach()).codes != result.codes
        if not wrong.any():
            return
        rotated = rotate(layer.weight.detach().to(torch.float64), layer.weight_quantizer.cfg)
        rotated[wrong] = result.quantized.to(torch.float64)[wrong]
        layer.weight.copy_(unrotate(rotated, layer).to(layer.weight.dtype))


def gptq_problem(net: nn.Module) -> str | None:
    """Why GPTQ cannot round this model (one line), or None. Checked before any weight is read
    (it works on a meta-device model): a quantized weight GPTQ has no rounding for (say Q4_1's
    offset grid) is refused, never skipped; a 16-bit weight has nothing to round. A layer whose
    input rotation was folded into its cached weight (fold_input_rotations, for decoding) no
    longer runs its input quantizer, so no Hessian could be collected."""
    layers = {n: m for n, m in net.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in layers.items():
        why = gptq_unsupported_reason(layer.weight_quantizer.cfg)
        if why is not None and layer.weight_quantizer.cfg.enabled:
            return f"GPTQ does not support quant.weight {why} (layer {name}); use --method rtn"
        if layer.fold_input_rotation:
            return f"layer {name} has its input rotation folded into its weight (fold_input_rotations, for decoding); GPTQ needs the training forward"
    if not any(gptq_unsupported_reason(m.weight_quantizer.cfg) is None for m in layers.values()):
        return "GPTQ found no quantized weight to round (every block linear is 16-bit or excluded)"
    return None


@torch.no_grad()
def gptq_model(
    net: nn.Module, batches: Iterable[torch.Tensor], *, block: int = 128, damp: float = 0.01, log: Callable[[str], None] = print
) -> list[LayerReport]:
    """Replace the latent weight of every quantized block linear of `net` (our Llama) by its
    GPTQ-compensated latent; `batches` are token-id tensors [B, T]. Returns a report per layer."""
    if why := gptq_problem(net):
        raise ValueError(why)
    net.eval()
    device = next(net.parameters()).device
    inputs = [net.embed(idx.to(device)) for idx in batches]
    if not inputs:
        raise ValueError("GPTQ needs at least one calibration batch")
    rope = net._rope(inputs[0].shape[1], device)
    reports = []
    for index, blk in enumerate(net.layers):
        layers = {n: m for n, m in blk.named_modules() if isinstance(m, QuantLinear) and gptq_unsupported_reason(m.weight_quantizer.cfg) is None}
        hooks = {n: _HessianHook(m.in_features, device) for n, m in layers.items()}
        handles = [m.input_quantizer.register_forward_hook(hooks[n]) for n, m in layers.items()]
        for x in inputs:
            blk(x, rope, None, index)
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            cfg, grid = layer.weight_quantizer.cfg, layer.weight_quantizer.grid
            if hooks[name].rows == 0:  # an all-zero Hessian would zero every weight without a word
                raise ValueError(f"GPTQ collected no inputs for layers.{index}.{name}: its input quantizer never ran")
            hessian = hooks[name].hessian()
            rotated = rotate(layer.weight.detach().to(torch.float64), cfg)
            rtn = fake_quantize(layer.weight.detach().to(torch.float64), cfg, grid).value  # rotates itself
            held = layer.weight_quantizer.held_scale(layer.weight.detach())  # None: refitted in every forward
            fixed = None if held is None else held.detach().reshape(held.shape[0], -1)
            result = gptq(rotated, hessian, cfg, grid, block=block, damp=damp, scale=fixed)
            layer.weight.copy_(unrotate(result.latent, layer).to(layer.weight.dtype))
            if held is not None:
                pin_codes(layer, result)
            # What the forward now computes from the stored latent (its own scale, dtype).
            now = layer.weight_quantizer.quantize(layer.weight.detach())
            agreement = float((now.codes == result.codes).double().mean())
            reports.append(
                LayerReport(
                    f"layers.{index}.{name}", agreement,
                    _relative_output_error(hessian, rotated, rtn), _relative_output_error(hessian, rotated, now.value),
                )
            )  # fmt: skip
        inputs = [blk(x, rope, None, index) for x in inputs]  # the next block sees this one quantized
        worst = max(reports[-len(layers) :], key=lambda r: r.output_error_gptq, default=None)
        if worst is not None:
            log(f"GPTQ block {index}: {len(layers)} linears, worst output error {worst.output_error_gptq:.4f} (RTN {worst.output_error_rtn:.4f}) at {worst.name}")
    return reports
