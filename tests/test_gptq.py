"""GPTQ: the blocked, Cholesky form equals a direct implementation of the GPTQ update; it
beats round-to-nearest on a layer's output error; block-by-block calibration of a model;
and scripts/ptq.py's checkpoints are read by evaluate/export and start QAT (init_from)."""

import json
import subprocess
import sys

import pytest
import torch

from qat import QuantizerConfig, make_grid
from qat.quant.gptq import _column_scales, _gptq_pass, fitted_scale, gptq, inverse_hessian_factor
from qat.quant.linear import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def direct_gptq(w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, grid, damp: float) -> torch.Tensor:
    """GPTQ as its paper states it: round column i, then w_j -= (w_i - q_i) [H^-1]_ij / [H^-1]_ii
    for the later columns j, and remove column i from H^-1 by its Schur complement."""
    from qat.quant.grids import round_to_grid

    w, h = w.clone(), hessian.clone()
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.inv(h)
    q = torch.empty_like(w)
    for i in range(w.shape[1]):
        q[:, i] = round_to_grid(w[:, i : i + 1], scales[:, i : i + 1], grid)[0][:, 0]
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i + 1 :] -= err.unsqueeze(1) * hinv[i, i + 1 :].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    scales = torch.logspace(0, 1, k, dtype=torch.float64)  # outlier-ish channels, as in real models
    return (torch.randn(n, k, generator=g, dtype=torch.float64) @ mix) * scales


@pytest.mark.parametrize("granularity", ["row", 16])
@pytest.mark.parametrize("block", [4, 64])
def test_blocked_cholesky_form_equals_the_direct_update(granularity, block):
    cfg = QuantizerConfig(bits=3, rotation="none", granularity=granularity)
    grid = make_grid(3)
    w = torch.randn(24, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs(512, 64)
    hessian = 2 * x.T @ x / x.shape[0]
    scales = _column_scales(fitted_scale(w, cfg, grid), cfg, 64)
    hinv, _ = inverse_hessian_factor(hessian, 0.01)
    _, blocked, _ = _gptq_pass(w, scales, hinv, grid, block)
    assert torch.equal(blocked, direct_gptq(w, hessian, scales, grid, 0.01))


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_output_error_is_below_rtn(rotation, bits):
    """Through the real layer: the latent GPTQ stores, quantized by the layer's own forward."""
    torch.manual_seed(0)
    cfg = QuantizerConfig(bits=bits, rotation=rotation)
    layer = QuantLinear(128, 32, bias=False, weight_config=cfg, input_config=QuantizerConfig(bits=16, rotation=rotation)).double().eval()
    x = correlated_inputs(1024, 128, seed=2)
    reference = x @ layer.weight.detach().T
    with torch.no_grad():
        rtn_error = (layer(x) - reference).square().mean()
        xr = layer.input_quantizer(x)  # the rotated input the layer multiplies
        rotated = layer.input_quantizer(layer.weight.detach())  # 16-bit quantizer: only the rotation
        result = gptq(rotated, 2 * xr.T @ xr / xr.shape[0], cfg, layer.weight_quantizer.grid)
        latent = result.latent if rotation == "none" else layer.input_quantizer(result.latent)  # Sylvester H is its own inverse
        layer.weight.copy_(latent)
        gptq_error = (layer(x) - reference).square().mean()
    assert result.code_agreement > 0.97
    assert gptq_error < 0.95 * rtn_error, (float(gptq_error), float(rtn_error))


def test_gptq_refuses_what_it_cannot_round():
    with pytest.raises(ValueError, match="GPTQ does not support scale='lsq'"):
        gptq(torch.zeros(2, 8), torch.eye(8), QuantizerConfig(bits=4, scale="lsq", estimator="lsq", rotation="none"), make_grid(4))


def test_model_calibration_lowers_every_layers_error():
    from qat.models.llama import Llama
    from qat.models.sizes import llama_config
    from qat import quantize_model
    from qat.ptq.calibration import gptq_model

    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=60, max_seq_len=32)).double()
    quantize_model(net, QuantizerConfig(bits=3), QuantizerConfig(bits=4))
    batches = [torch.randint(0, 60, (4, 32)) for _ in range(4)]
    reports = gptq_model(net, batches, log=lambda _: None)
    assert len(reports) == 5 * len(net.layers)
    for r in reports:
        assert r.output_error_gptq < r.output_error_rtn and r.code_agreement > 0.97, r


def _tiny_quantized(weight: QuantizerConfig, activation: QuantizerConfig):
    from qat import quantize_model
    from qat.models.llama import Llama
    from qat.models.sizes import llama_config

    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=60, max_seq_len=32)).double()
    quantize_model(net, weight, activation)
    return net


def test_gptq_refuses_an_offset_grid_instead_of_skipping_it():
    from qat.ptq.calibration import gptq_model

    q4_1 = QuantizerConfig(bits=4, rotation="none", asymmetric=True, granularity=32, scale="absmax")
    net = _tiny_quantized(q4_1, QuantizerConfig(bits=16, rotation="none"))
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"GPTQ does not support quant.weight asymmetric=true .* use --method rtn"):
        gptq_model(net, [torch.randint(0, 60, (2, 32))], log=lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # nothing touched


def test_gptq_refuses_folded_input_rotations_instead_of_zeroing_the_weights():
    from qat.ptq.calibration import gptq_model
    from qat.quant.linear import fold_input_rotations

    w4 = QuantizerConfig(bits=4, hadamard_block=16)
    net = _tiny_quantized(w4, QuantizerConfig(bits=16, hadamard_block=16)).eval()
    fold_input_rotations(net)
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="input rotation folded"):
        gptq_model(net, [torch.randint(0, 60, (2, 32))], log=lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
