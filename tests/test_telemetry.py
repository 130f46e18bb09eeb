"""Quantizer telemetry: a callback computing statistics from fake_quantize, outside the quantizers."""

import math

import numpy as np
import pytest
import torch

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat import Quantizer, QuantizerConfig, make_grid, optimal_gaussian_scale, quantization_mse, quantize_model
from qat.train.telemetry import collect_stats, quantizer_stats, telemetry_metrics


def test_stats_match_the_gaussian_closed_forms():
    quant = Quantizer(QuantizerConfig(bits=2, rotation="none"))
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    stats = quantizer_stats(quant, x)
    expected = quantization_mse(optimal_gaussian_scale(2) * np.asarray(make_grid(2).levels))
    assert abs(stats["rel_error"] / expected - 1) < 0.05
    # default trust == clip at s*4/3 for 2 bits: P(|X| > 1.4935*4/3) for a Gaussian
    p = math.erfc(optimal_gaussian_scale(2) * 4 / 3 / math.sqrt(2))
    assert abs(stats["masked_fraction"] - p) < 0.01


def test_quantizer_holds_only_its_config_and_learnable_scale():
    plain = Quantizer(QuantizerConfig(bits=4))
    assert list(plain.state_dict()) == [] and not hasattr(plain, "stats") and not hasattr(plain, "track_stats")
    lsq = Quantizer(QuantizerConfig(bits=4, scale="lsq", estimator="lsq", rotation="none"))
    assert sorted(lsq.state_dict()) == ["scale", "scale_initialized"]


def _net(**quant):
    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=64, max_seq_len=32))
    quantize_model(net, QuantizerConfig(**quant), QuantizerConfig(**quant))
    return net


def test_collect_stats_covers_every_quantizer_and_changes_nothing():
    net = _net(bits=4)
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    logits = net(idx)
    stats = collect_stats(net, idx)
    assert len(stats) == 2 * 5  # qkv, proj, gate, up, down; weight and input each, weight and input each
    assert all(0.005 < s["rel_error"] < 0.05 and 0 <= s["masked_fraction"] < 0.1 for s in stats.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(net(idx), logits)
    assert not any(q._forward_hooks for q in net.modules() if isinstance(q, Quantizer))  # hooks removed
    metrics = telemetry_metrics(stats)
    assert "quant/layers.0.mlp.down.input_quantizer/masked_fraction" in metrics and "quant/mean_rel_error" in metrics


@pytest.mark.slow  # subprocesses or compilation: out of the quick loop, in CI's suite
def test_telemetry_does_not_recompile_the_training_graph():
    net = _net(bits=4)
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    compiled(idx)
    compiled(idx)  # the first call builds the RoPE table: a second graph, once
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(2):
        collect_stats(net, idx)  # eager, with hooks
        compiled(idx)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
