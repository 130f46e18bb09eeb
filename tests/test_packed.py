"""The parity gate of the packed format: for every weight format, the exported-and-loaded
packed model has exactly the fake-quant model's weight codes and dequantized weights, its
layer outputs (float64: within 1e-12 relative; the dequantize path: bit-identical), its
logits and its greedy tokens.

Models are debug-xs (1 layer, d = 128, SwiGLU hidden 384), perturbed off their init, in
float64 so that the only difference left is the float summation order of the integer path.
One exception is checked rather than skipped: without a rotation, an exactly-zero integer
dot product is an exact rounding tie on the zero-free "int" grid; the packed model rounds it
by the rule, the fake-quant float sum is +-1e-17 noise and may land on the other side.
"""

import itertools
from fractions import Fraction

import pytest
import torch

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat.data.tokenizer import ByteTokenizer
from qat.packed.export import export_packed
from qat.packed.format import IntegerForm, integer_form, to_int8
from qat.packed.linear import PackedLinear, forward_path, integer_matmul
from qat.packed.load import load_packed
from qat.quant.config import QuantizerConfig
from qat.quant.convert import quantize_model
from qat.quant.grids import make_grid
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize, grouped, rotate
from qat.quant.sparsity import two_of_four_mask

RUN_CONFIG = {"model": {"size": "debug-xs"}, "note": "test"}
# Errors are relative to max|reference|. The integer path sums exactly and the fake-quant
# matmul rounds each product and partial sum, so they differ by float summation error: at most
# ~K * eps relative per layer (K <= 384 here: 4e-14 in float64, 2.3e-5 in float32); measured
# 1.7e-15 (float64) and 6e-7 (float32). A flipped activation code would be ~1e-3 or more.
TOL_FP64 = 1e-12
TOL_FP32 = 2e-5

WEIGHT_FORMATS = [
    *((b, "int") for b in (1, 1.58, 2, 3, 4, 8)),
    *((b, "int_zero") for b in (1.58, 2, 3, 4, 8)),
    *((b, "gaussian") for b in (1, 1.58, 2, 3, 4, 8)),
    (4, "fp4"),
]
# (activations quantized, hadamard, 2:4): each format gets one triple and its complement, the
# triples cycling so that all 8 occur; every axis value meets every format.
_TRIPLES = [(True, True, False), (True, False, True), (False, True, True), (False, False, False)]


def _case(bits, grid, act, had, sparse, **extra):
    w = {"bits": bits, "grid": grid, "rotation": "hadamard" if had else "none", "sparsity": "2:4" if sparse else "none"}
    a = {"bits": bits if act else 16, "grid": grid, "rotation": w["rotation"]}
    w.update(extra.pop("weight", {}))
    a.update(extra.pop("activation", {}))
    name = f"w{bits}{grid}-{'a' if act else 'a16'}-{'had' if had else 'plain'}{'-2of4' if sparse else ''}"
    return pytest.param(w, a, id=extra.pop("id", name))


MATRIX = [
    _case(b, g, *(triple if flip == 0 else tuple(not v for v in triple)))
    for i, (b, g) in enumerate(WEIGHT_FORMATS)
    for flip, triple in enumerate([_TRIPLES[i % 4]] * 2)
]
EXTRA = [
    _case(4, "int", True, True, False, id="quest-w4a4-group32", weight={"granularity": 32}, activation={"granularity": 32}),
    _case(8, "int", True, True, False, id="w8a8-int-group64-row", weight={"granularity": 64}),
    _case(8, "int_zero", True, False, False, id="w8a8-int_zero-group32", weight={"granularity": 32}, activation={"granularity": 32}),
    _case(4, "gaussian", True, True, True, id="w4-gaussian-2of4-group32", weight={"granularity": 32}, activation={"granularity": 32}),
    _case(4, "int", True, True, False, id="w4int-a8int_zero", activation={"bits": 8, "grid": "int_zero"}),
    _case(4, "fp4", True, True, False, id="w4fp4-a4int", activation={"grid": "int"}),
    _case(3, "int", True, True, False, id="w3-absmax-a-mse_search", weight={"scale": "absmax"}, activation={"scale": "mse_search"}),
    _case(4, "int", True, False, False, id="lsq", weight={"scale": "lsq", "estimator": "lsq"}, activation={"scale": "lsq", "estimator": "lsq"}),
    _case(2, "int_zero", True, False, False, id="pact-a", activation={"scale": "lsq", "estimator": "pact"}),
    _case(4, "int_zero", False, False, False, id="w4-frozen-scale-group32", weight={"granularity": 32, "scale": "absmax", "scale_update": "frozen"}),
    _case(4, "int", True, True, False, id="w4a4-learned-scale-row", weight={"scale_update": "learned"}),
    _case(16, "int", True, True, False, id="w16-a4", activation={"bits": 4}),
    _case(16, "int", False, False, False, id="bf16-all-16-bit"),
    _case(4, "int", True, True, False, id="hadamard-block32", weight={"hadamard_block": 32}, activation={"hadamard_block": 32}),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add contention


def build_fake_quant(weight: dict, activation: dict, seed: int = 0, dtype=torch.float64, tie: bool = False, vocab_size: int = 257) -> Llama:
    """debug-xs, every weight moved off its init, quantized, in `dtype`, learned scales set."""
    torch.manual_seed(seed)
    net = Llama(llama_config("debug-xs", vocab_size=vocab_size, max_seq_len=64, tie_embeddings=tie))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * p.std().clamp_min(0.1) * 0.5)
    quantize_model(net, QuantizerConfig(**weight), QuantizerConfig(**activation))
    net = net.to(dtype).eval()
    with torch.no_grad():
        net(torch.randint(0, vocab_size, (2, 16)))  # the first batch initialises LSQ / PACT scales
        for name, p in itertools.chain(net.named_parameters(), net.named_buffers()):
            if name.endswith("quantizer.scale"):
                p.mul_(1.1)  # and move them (learned, or a stored weight scale) off their init too
    return net


def export_and_load(net, tmp_path, **kw):
    out = export_packed(net, ByteTokenizer(), RUN_CONFIG, 7, tmp_path / "packed", **kw)
    return load_packed(out).net


def quantized_layers(net) -> dict[str, QuantLinear]:
    return {n: m for n, m in net.named_modules() if isinstance(m, QuantLinear)}


def reference_codes(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The codes training's weight quantizer produces (kept ones under 2:4) and the positions."""
    wq = layer.weight_quantizer
    codes = fake_quantize(layer.weight.detach(), wq.cfg, wq.grid, wq.held_scale(layer.weight)).codes
    if wq.cfg.sparsity != "2:4":
        return codes, None
    keep = two_of_four_mask(rotate(layer.weight.detach(), wq.cfg))
    n, k = codes.shape
    positions = torch.arange(4).repeat(k // 4).expand(n, k)[keep].view(n, k // 2)
    return codes[keep].view(n, k // 2), positions


def greedy(net, prompt: torch.Tensor, steps: int = 8) -> torch.Tensor:
    idx = prompt
    for _ in range(steps):
        nxt = net(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[:, prompt.shape[1] :]


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def layer_inputs(net, prompt, kind) -> dict[str, torch.Tensor]:
    """The input every `kind` layer saw in one forward of `net`, by name."""
    seen, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, kind):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0])))
    net(prompt)
    for h in hooks:
        h.remove()
    return seen


def tie_prone(activation: dict) -> bool:
    """An exact 0 input is a rounding tie (the 'int' grid at even n has a boundary at 0), and
    without a rotation an exactly-zero integer dot product upstream feeds one in unchanged."""
    cfg = QuantizerConfig(**activation)
    return cfg.enabled and cfg.grid == "int" and make_grid(cfg.bits, "int").size % 2 == 0 and cfg.rotation == "none"


def rounding_position(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """Where each input lands on its uniform grid: code = floor(position), so a position
    within e of an integer is within e (in grid steps) of a rounding boundary."""
    q = layer.input_quantizer
    out = fake_quantize(x, q.cfg, q.grid, q.held_scale(x))
    xg = grouped(rotate(x, q.cfg), q.cfg.granularity)
    c = q.grid.center
    return ((xg / out.scale).clamp(-1, 1) * c + (c + 0.5)).reshape(x.shape)


def first_code_difference(fake, packed, prompt) -> tuple[str, float] | None:
    """At the first layer whose activation codes differ between the two models (each on its
    own inputs): (its name, the largest distance of a differing input from a rounding
    boundary, in grid steps, taken over both models); None when no code differs."""
    xf, xp = layer_inputs(fake, prompt, QuantLinear), layer_inputs(packed, prompt, PackedLinear)
    for name, layer in quantized_layers(fake).items():
        pf, pp = rounding_position(xf[name], layer), rounding_position(xp[name], layer)
        differ = pf.floor() != pp.floor()
        if differ.any():
            boundary = torch.maximum(pf, pp)[differ].floor()  # the integer between them
            return name, max((pf[differ] - boundary).abs().max().item(), (pp[differ] - boundary).abs().max().item())
    return None


@torch.no_grad()
@pytest.mark.slow  # the whole format matrix: in the full (CI) suite, outside the quick loop
@pytest.mark.parametrize("weight, activation", MATRIX + EXTRA)
def test_packed_equals_fake_quant(weight, activation, tmp_path):
    fake = build_fake_quant(weight, activation)
    packed = export_and_load(fake, tmp_path)
    layers = quantized_layers(fake)
    assert [n for n, m in packed.named_modules() if isinstance(m, PackedLinear)] == list(layers)
    for name, layer in layers.items():
        got = packed.get_submodule(name)
        if not layer.weight_quantizer.cfg.enabled:
            assert got.weight_codes is None and torch.equal(got.weight, layer.weight)
            continue
        codes, positions = reference_codes(layer)
        assert torch.equal(got.unpacked_weight_codes().long(), codes.long()), name
        if positions is not None:
            assert torch.equal(got.unpacked_weight_positions().long(), positions), name
        fq = layer.weight_quantizer(layer.weight)
        assert torch.equal(got.dequantized_weight(), fq), name  # the very values training used
    prompt = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    exact = all(m.path == "dequantize" for m in packed.modules() if isinstance(m, PackedLinear))
    # Layer by layer on the fake-quant model's own inputs: no error can cascade here.
    for name, x in layer_inputs(fake, prompt, QuantLinear).items():
        ref, out = layers[name](x), packed.get_submodule(name)(x)
        assert torch.equal(out, ref) if exact else max_rel_error(out, ref) < TOL_FP64, name
    ref, out = fake(prompt), packed(prompt)
    if tie_prone(activation) and (diff := first_code_difference(fake, packed, prompt)) is not None:
        # The packed model rounds an exact 0 by the grid's rule; the fake-quant float sum of
        # the same zero dot product is +-1e-17 noise and lands on either side. Nothing else
        # may differ, and the logits then legitimately diverge by a quantization step.
        name, distance = diff
        assert distance < 1e-12, (name, distance)
        return
    assert torch.equal(out, ref) if exact else max_rel_error(out, ref) < TOL_FP64
    assert torch.equal(greedy(packed, prompt), greedy(fake, prompt))


def assert_float32_parity(fake, packed, prompt) -> None:
    """Layer outputs within float32 summation error; then equal logits and greedy tokens,
    unless an activation code flipped at a near-tie (an input within float32 summation error
    of a rounding boundary may round either way; at 8 bits the steps are fine enough for this
    to happen in a forward pass), which must then be all that differs first."""
    for name, x in layer_inputs(fake, prompt, QuantLinear).items():
        assert max_rel_error(packed.get_submodule(name)(x), fake.get_submodule(name)(x)) < TOL_FP32, name
    diff = first_code_difference(fake, packed, prompt)
    if diff is not None:
        name, distance = diff
        assert distance < 1e-3, (name, distance)
        return
    assert max_rel_error(packed(prompt), fake(prompt)) < TOL_FP32
    assert torch.equal(greedy(packed, prompt), greedy(fake, prompt))


@torch.no_grad()
@pytest.mark.parametrize("bits", [4, 8])
def test_float32_logits_within_reordering_error(bits, tmp_path):
    fake = build_fake_quant({"bits": bits}, {"bits": bits}, dtype=torch.float32)
    packed = export_and_load(fake, tmp_path)
    assert_float32_parity(fake, packed, torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(2)))


@torch.no_grad()
def test_kv_cache_decoding_matches_full_recompute(tmp_path):
    cfg = {"bits": 4}
    packed = export_and_load(build_fake_quant(cfg, cfg, tie=True), tmp_path)
    assert packed.lm_head.weight is packed.embed.weight
    idx = torch.randint(0, 257, (2, 10), generator=torch.Generator().manual_seed(3))
    cache = packed.new_kv_cache(2, 16)
    steps = [packed(idx[:, :6], cache)[:, -1]] + [packed(idx[:, t : t + 1], cache)[:, -1] for t in range(6, 10)]
    full = packed(idx)
    for i, t in enumerate(range(5, 10)):
        assert max_rel_error(steps[i], full[:, t]) < TOL_FP64


@torch.no_grad()
def test_bfloat16_model_keeps_its_dtypes(tmp_path):
    cfg = {"bits": 4}
    fake = build_fake_quant(cfg, cfg, dtype=torch.bfloat16)
    packed = export_and_load(fake, tmp_path)
    assert packed.embed.weight.dtype == torch.bfloat16 and packed.norm.weight.dtype == torch.bfloat16
    layer = packed.layers[0].attn.qkv
    assert layer.weight_codes.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float32
    codes, _ = reference_codes(fake.layers[0].attn.qkv)
    assert torch.equal(layer.unpacked_weight_codes().long(), codes.long())
    assert torch.equal(layer.dequantized_weight(), fake.layers[0].attn.qkv.weight_quantizer(fake.layers[0].attn.qkv.weight))
    prompt = torch.randint(0, 257, (1, 8))
    assert packed(prompt).dtype == torch.bfloat16


def test_forward_path_is_decided_in_one_place():
    q = QuantizerConfig
    assert forward_path(q(bits=4), q(bits=4)) == "integer"
    assert forward_path(q(bits=1), q(bits=8, grid="int_zero")) == "integer"
    assert forward_path(q(bits=4, grid="gaussian"), q(bits=4)) == "dequantize"
    assert forward_path(q(bits=4), q(bits=4, grid="fp4")) == "dequantize"
    assert forward_path(q(bits=4), q(bits=16)) == "dequantize"
    assert forward_path(q(bits=4, sparsity="2:4"), q(bits=4)) == "dequantize"
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        forward_path(q(bits=4), q(bits=4), backend="cuda")


@pytest.mark.parametrize("grid, bits", [("int", b) for b in (1, 1.58, 2, 3, 4, 5, 6, 7, 8)] + [("int_zero", b) for b in (1.58, 2, 3, 4, 8)])
def test_integer_form_is_exact_and_int8(grid, bits):
    g = make_grid(bits, grid)
    form = integer_form(g)
    codes = torch.arange(g.size)
    u = to_int8(codes, form)
    assert torch.equal(u.long(), codes * form.code_mul - form.code_shift)  # no int8 wrap-around
    q = u.long() * form.mul + form.offset
    # value / s = (code - c) / c exactly = q / divisor, checked in rational arithmetic
    c = Fraction(g.center)
    for code, qi in zip(codes.tolist(), q.tolist()):
        assert Fraction(code) / c - 1 == Fraction(qi) / Fraction(form.divisor)


def test_integer_matmul_is_exact_with_offsets_and_groups():
    gen = torch.Generator().manual_seed(4)
    m, n, k = 5, 7, 96
    for (ga, gw), (fa, fw) in itertools.product([(1, 1), (3, 1), (3, 6), (12, 4)], [(IntegerForm(1, 128, 2, 1, 255.0),) * 2, (IntegerForm(1, 7, 1, 0, 7.0), IntegerForm(1, 128, 2, 1, 255.0))]):
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int64).to(torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int64).to(torch.int8)
        sa, sw = torch.rand(m, ga, generator=gen, dtype=torch.float64), torch.rand(n, gw, generator=gen, dtype=torch.float64)
        got = integer_matmul(a, fa, sa, w, fw, sw)
        va = (a.double() * fa.mul + fa.offset) * sa.repeat_interleave(k // ga, 1) / fa.divisor
        vw = (w.double() * fw.mul + fw.offset) * sw.repeat_interleave(k // gw, 1) / fw.divisor
        assert torch.allclose(got, va @ vw.T, rtol=1e-12, atol=0)


def test_matrix_covers_every_axis():
    seen = {(w["bits"], w["grid"], a["bits"] != 16, w["rotation"], w["sparsity"]) for w, a in (p.values for p in MATRIX)}
    assert {(b, g) for b, g, *_ in seen} == set(WEIGHT_FORMATS)
    for axis in (2, 3, 4):
        for fmt in WEIGHT_FORMATS:
            assert len({s[axis] for s in seen if s[:2] == fmt}) == 2
    assert len({s[2:] for s in seen}) == 8


# ---- the fast CPU backend (torch's int4 weight-packed kernel) against the torch reference ------


@pytest.mark.parametrize(
    "weight, activation, dtype, path",
    [
        ({"bits": 4}, {"bits": 16}, torch.bfloat16, "cpu-int4"),
        ({"bits": 4}, {"bits": 4}, torch.bfloat16, "cpu-int4"),
        ({"bits": 2}, {"bits": 16}, torch.bfloat16, "cpu-int4"),
        ({"bits": 3, "granularity": 64}, {"bits": 3}, torch.bfloat16, "cpu-int4"),
        ({"bits": 1.58, "grid": "int_zero"}, {"bits": 8}, torch.bfloat16, "cpu-int4"),
        ({"bits": 4, "grid": "int_zero", "rotation": "none"}, {"bits": 16, "rotation": "none"}, torch.bfloat16, "cpu-int4"),
        ({"bits": 4}, {"bits": 16}, torch.float32, "cpu-dequantize"),  # the kernel is slow on float32
        ({"bits": 1}, {"bits": 4}, torch.float32, "cpu-dequantize"),
        ({"bits": 8}, {"bits": 8}, torch.bfloat16, "cpu-dequantize"),
        ({"bits": 4, "grid": "gaussian"}, {"bits": 16}, torch.bfloat16, "cpu-dequantize"),
        ({"bits": 4, "sparsity": "2:4"}, {"bits": 16}, torch.float32, "cpu-dequantize"),
    ],
)
def test_cpu_backend_equals_the_torch_reference(weight, activation, dtype, path, tmp_path):
    """The same values through another kernel: every layer within the dtype's summation error
    of the reference on the same input (float32: 2e-5; bfloat16, whose sums round at 8 bits:
    2e-2); greedy tokens equal in float32 (8-bit activations excepted: their fine steps make
    near-ties, and a flipped code, likely)."""
    fake = build_fake_quant(weight, activation, dtype=dtype)
    out = export_packed(fake, ByteTokenizer(), RUN_CONFIG, 7, tmp_path / "packed")
    reference, fast = load_packed(out, backend="torch").net, load_packed(out).net  # auto on the CPU is "cpu"
    assert {m.path for m in fast.modules() if hasattr(m, "path")} == {path}
    prompt = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(4))
    tolerance = TOL_FP32 if dtype == torch.float32 else 2e-2
    for name, x in layer_inputs(reference, prompt, PackedLinear).items():
        assert max_rel_error(fast.get_submodule(name)(x), reference.get_submodule(name)(x)) < tolerance, name
    with torch.no_grad():
        assert torch.equal(fast(prompt), fast(prompt))  # the kept weight is reused, unchanged
    if activation["bits"] != 8 and dtype == torch.float32:
        assert greedy(reference, prompt[:1]).tolist() == greedy(fast, prompt[:1]).tolist()
