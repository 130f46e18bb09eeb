"""Gradient alignment between the quantized and the full-precision gradient."""

import pytest
import torch

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat import QuantizerConfig, quantize_model
from qat.train.alignment import alignment_metrics, gradient_alignment, quantizers_off


def _net(weight: QuantizerConfig, activation: QuantizerConfig) -> Llama:
    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=64, max_seq_len=32))
    quantize_model(net, weight, activation)
    return net


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 32), generator=g)
    return x, torch.roll(x, -1, dims=1)


def test_sixteen_bit_hadamard_is_exactly_aligned():
    """16 bits with Hadamard is an exact reparametrisation: cos = 1 within fp32 error."""
    net = _net(QuantizerConfig(bits=16), QuantizerConfig(bits=16))
    stats = gradient_alignment(net, *_batch())
    assert len(stats) == 5
    for s in stats.values():
        assert s["cos"] == pytest.approx(1.0, abs=1e-5) and s["norm_ratio"] == pytest.approx(1.0, abs=1e-4) and s["mask_fraction"] == 1.0


def test_eight_bit_ste_without_rotation_is_close_to_aligned():
    cfg = QuantizerConfig(bits=8, rotation="none", estimator="ste")
    stats = gradient_alignment(_net(cfg, cfg), *_batch())
    assert min(s["cos"] for s in stats.values()) > 0.98 and alignment_metrics(stats)["align/mean_cos"] > 0.99


def test_low_bits_align_worse_and_trust_masks_some_elements():
    cfg = QuantizerConfig(bits=2)
    stats = gradient_alignment(_net(cfg, cfg), *_batch())
    metrics = alignment_metrics(stats)
    assert metrics["align/mean_cos"] < 0.99 and metrics["align/mean_mask_fraction"] < 1.0
    assert "align/layers.0.mlp.down/cos" in metrics


def test_the_measurement_changes_nothing():
    cfg = QuantizerConfig(bits=4)
    net = _net(cfg, cfg)
    x, y = _batch()
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    logits = net(x)
    gradient_alignment(net, x, y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(net(x), logits)
    with quantizers_off(net):
        plain = net(x)
    assert not torch.equal(plain, logits) and torch.equal(net(x), logits)  # off inside only


def test_learned_scales_are_used():
    """LSQ / PACT weights quantize with their learned scale (there is no fit to fall back on)."""
    cfg = QuantizerConfig(bits=4, scale="lsq", estimator="lsq", rotation="none")
    net = _net(cfg, cfg)
    stats = gradient_alignment(net, *_batch())
    assert all(0 < s["cos"] <= 1.0 + 1e-9 and 0 < s["mask_fraction"] <= 1 for s in stats.values())
