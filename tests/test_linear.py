import pytest
import torch.nn.functional as F
import torch
from torch import nn

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat import QuantizerConfig, QuantLinear, quantize_model, quantizers

W4 = QuantizerConfig(bits=4)


def test_sixteen_bits_equals_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    x = torch.randn(5, 7, 256)
    plain = QuantLinear.from_linear(lin, QuantizerConfig(bits=16, rotation="none"), QuantizerConfig(bits=16, rotation="none"))
    assert torch.equal(plain(x), lin(x))
    rotated = QuantLinear.from_linear(lin, QuantizerConfig(bits=16), QuantizerConfig(bits=16))
    assert torch.allclose(rotated(x), lin(x), atol=5e-6, rtol=0)  # (xH)(WH)^T = x W^T, fp32 rounding


def test_from_linear_shares_parameters_and_to_linear_round_trips():
    lin = nn.Linear(128, 64)
    q = QuantLinear.from_linear(lin, W4, W4)
    assert q.weight is lin.weight and q.bias is lin.bias
    back = q.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight
    assert set(q.state_dict()) == {"weight", "bias"}  # quantizers add no state (non-LSQ)


def test_w4a4_matches_quantize_then_matmul_in_rotated_basis():
    torch.manual_seed(1)
    lin = nn.Linear(256, 32, bias=False)
    x = torch.randn(4, 256)
    q = QuantLinear.from_linear(lin, W4, W4)
    from qat import Quantizer

    manual = Quantizer(W4)(x) @ Quantizer(W4)(lin.weight).T
    assert torch.equal(q(x), manual)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert 0.05 < rel < 0.25  # 4-bit on both sides: a ~0.11 relative error per operand


def test_mismatched_rotation_is_rejected():
    with pytest.raises(ValueError, match="must match"):
        QuantLinear(128, 8, weight_config=W4, input_config=QuantizerConfig(bits=16, rotation="none"))


def test_quantize_model_swaps_exactly_the_block_linears():
    model = Llama(llama_config("debug", vocab_size=64))
    names = quantize_model(model, weight=W4, activation=W4)
    expected = [f"layers.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")]
    assert names == expected
    assert type(model.lm_head) is nn.Linear and type(model.embed) is nn.Embedding
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert len(quantizers(model)) == 2 * len(names)
    assert quantize_model(model, weight=W4, activation=W4) == []  # idempotent


def test_quantize_model_filter_and_plain_equivalence():
    torch.manual_seed(2)
    model = Llama(llama_config("debug", vocab_size=64))
    idx = torch.randint(0, 64, (2, 16))
    ref = model(idx)
    names = quantize_model(model, {"bits": 16}, {"bits": 16}, filter_fn=lambda m, n: n.endswith("mlp.down"))
    assert names == ["layers.0.mlp.down", "layers.1.mlp.down"]
    assert torch.allclose(model(idx), ref, atol=1e-5)


def test_quantized_model_trains():
    torch.manual_seed(3)
    model = Llama(llama_config("debug", vocab_size=32))
    quantize_model(model, W4, W4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 32, (4, 33))
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow  # inductor compiles three models: ~45 s on 2 cores
@pytest.mark.parametrize("cfg", [W4, QuantizerConfig(bits=2, estimator="clip", clip_scale=1.3), QuantizerConfig(bits=4, sparsity="2:4")])
def test_quantized_model_compiles_without_graph_breaks(cfg):
    # fullgraph=True fails on any graph break: the quantizer forward must read only
    # constants (no cached-function calls, no data-dependent Python control flow).
    torch.manual_seed(4)
    model = Llama(llama_config("debug-xs", vocab_size=32))
    quantize_model(model, cfg, cfg)
    idx = torch.randint(0, 32, (2, 16))
    eager = model(idx)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(idx)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(model.parameters(), grads))


# ---- eval-time weight cache ------------------------------------------------------------------


def _cached_layer(weight_cfg=None):
    torch.manual_seed(0)
    cfg = weight_cfg or QuantizerConfig(bits=4)
    return QuantLinear(128, 32, bias=True, weight_config=cfg, input_config=QuantizerConfig(bits=4))


def _uncached(layer, x):
    return F.linear(layer.input_quantizer(x), layer.weight_quantizer(layer.weight), layer.bias)


def test_eval_cache_is_bitwise_equal_and_reused():
    layer, x = _cached_layer().eval(), torch.randn(5, 128)
    with torch.no_grad():
        first = layer(x)
        cached = layer._weight_cache[1]
        assert torch.equal(first, _uncached(layer, x))
        assert torch.equal(layer(x), first) and layer._weight_cache[1] is cached  # reused, not recomputed
    with torch.inference_mode():
        assert torch.equal(layer(x), first)


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "train()", "to(float64)", "in-place edit", "learned scale", "quantizer swapped"])
def test_eval_cache_is_invalidated(change):
    weight_cfg = QuantizerConfig(bits=4, scale="lsq", estimator="lsq") if change == "learned scale" else None
    layer, x = _cached_layer(weight_cfg), torch.randn(5, 128)
    if change == "learned scale":  # LSQ initialises its scale on the first training forward
        layer(x).sum().backward()
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    if change == "optimizer step":
        layer.train()
        layer(x).square().sum().backward()
        torch.optim.SGD(layer.parameters(), lr=0.5).step()
        layer.eval()
    elif change == "load_state_dict":
        state = {k: v + 0.3 if k == "weight" else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
    elif change == "train()":
        layer.train()
        assert layer._weight_cache is None
        layer.eval()
    elif change == "to(float64)":
        layer.double()
        x = x.double()
    elif change == "in-place edit":
        with torch.no_grad():
            layer.weight.mul_(-1)
    elif change == "quantizer swapped":  # what layer sensitivity's probes do
        from qat import Quantizer

        layer.weight_quantizer = Quantizer(QuantizerConfig(bits=2))
    else:
        with torch.no_grad():
            layer.weight_quantizer.scale.mul_(2)
    with torch.no_grad():
        after = layer(x)
        assert torch.equal(after, _uncached(layer, x))
    if change != "train()":
        assert not torch.equal(after.double(), before.double())


def test_training_is_unaffected_by_the_cache():
    layer, x = _cached_layer(), torch.randn(5, 128)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    out = layer(x)
    assert layer._weight_cache is None and out.requires_grad
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    layer.eval()
    out = layer(x)  # eval WITH autograd (e.g. gradient alignment): recomputed, differentiable
    assert out.requires_grad and layer._weight_cache is None


# ---- folding a 16-bit input's rotation into the cached weight (decoding) ----------------------


@pytest.mark.parametrize("block", [64, "full"])  # "full" on 96 = 12 x 8: a Paley factor, not symmetric
def test_folded_rotation_computes_the_same_layer(block):
    from qat.quant.linear import fold_input_rotations

    torch.manual_seed(0)
    w4, a16 = QuantizerConfig(bits=4, hadamard_block=block), QuantizerConfig(bits=16, hadamard_block=block)
    layer = QuantLinear.from_linear(nn.Linear(192 if block == 64 else 96, 32), w4, a16).double().eval()
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        reference = layer(x)
        assert fold_input_rotations(nn.Sequential(layer)) == ["0"] and layer.fold_input_rotation
        folded = layer(x)
        assert layer._weight_cache[0][0] is True  # the folded weight is what is cached
    assert (folded - reference).abs().max() < 1e-12 * reference.abs().max()
    # training and autograd keep training's forward, bit for bit
    layer.train()
    assert torch.equal(layer(x).detach(), reference) and layer._weight_cache is None


def test_only_16_bit_rotated_inputs_are_folded():
    from qat.quant.linear import fold_input_rotations

    torch.manual_seed(1)
    net = Llama(llama_config("debug", vocab_size=64))
    quantize_model(net, QuantizerConfig(bits=4), QuantizerConfig(bits=16))
    mlp = net.layers[0].mlp
    for name in ("gate", "up", "down"):  # W4A4 there
        setattr(mlp, name, QuantLinear.from_linear(getattr(mlp, name).to_linear(), QuantizerConfig(bits=4), QuantizerConfig(bits=4)))
    net.eval()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = net(idx)
        folded = fold_input_rotations(net)
        after = net(idx)
    assert "layers.0.attn.qkv" in folded and not any(n.startswith("layers.0.mlp") for n in folded)
    assert len(folded) == 5 * net.cfg.n_layer - 3
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        net.layers[1].attn.qkv.weight.mul_(2)  # in place (as an optimizer step): the folded cache must follow
        assert not torch.allclose(net(idx), after)
