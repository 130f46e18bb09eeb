import numpy as np
import pytest
import torch
from torch import nn

from qat import QuantizerConfig, QuantLinear, Quantizer, fake_quantize, quantize_model
from qat.quant import hadamard
from qat.quant.fused import fused_fake_quantize
from qat.quant.hadamard import _butterfly, check_block, hadamard_matrix, hadamard_transform
from qat.quant.hadamard_orders import (
    dense_hadamard,
    describe,
    field_multiply,
    hadamard_factorization,
    has_construction,
    irreducible_polynomial,
    largest_constructible_block,
    paley_i,
    paley_ii,
    quadratic_character,
    sylvester,
)


@pytest.mark.parametrize("block", [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_matches_explicit_sylvester_matrix_float64(block):
    torch.manual_seed(block)
    x = torch.randn(3, 2 * block, dtype=torch.float64)
    h = torch.block_diag(hadamard_matrix(block, torch.float64), hadamard_matrix(block, torch.float64))
    assert torch.allclose(hadamard_transform(x, block), x @ h, atol=1e-12, rtol=0)


def test_sylvester_recursion_and_orthonormality():
    h8 = hadamard_matrix(8, torch.float64)
    h4 = hadamard_matrix(4, torch.float64)
    assert torch.allclose(h8 * 8**0.5, torch.cat([torch.cat([h4, h4], 1), torch.cat([h4, -h4], 1)], 0) * 4**0.5)
    for n in (2, 64, 1024):
        h = hadamard_matrix(n, torch.float64)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.equal(h, h.T)


@pytest.mark.parametrize("block", [2, 128, "full"])
def test_self_inverse_and_norm_preserving(block):
    x = torch.randn(5, 7, 256, dtype=torch.float64)
    y = hadamard_transform(x, block)
    assert torch.allclose(hadamard_transform(y, block), x, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12)


def test_linear_layer_invariance():
    x, w = torch.randn(4, 512, dtype=torch.float64), torch.randn(32, 512, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x) @ hadamard_transform(w).T, x @ w.T, atol=1e-10)


def test_low_precision_is_computed_in_fp32():
    x = torch.randn(4, 1024)
    ref = hadamard_transform(x.double(), 1024)
    out = hadamard_transform(x.bfloat16(), 1024)
    assert out.dtype == torch.bfloat16
    # one bf16 rounding of the result, not one per butterfly stage
    assert ((out.double() - ref).abs() / ref.abs().clamp_min(1e-3)).median() < 4e-3


def test_gradient_is_the_transform_itself():
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 64, dtype=torch.float64)
    hadamard_transform(x, 16).backward(g)
    assert torch.allclose(x.grad, hadamard_transform(g, 16), atol=1e-12)


def test_butterfly_is_unscaled_walsh_hadamard():
    # integer inputs stay integers: no dense matmul, only additions and subtractions
    x = torch.arange(8.0).reshape(1, 8)
    assert torch.equal(_butterfly(x, 8), (x @ (hadamard_matrix(8, torch.float64) * 8**0.5).float()))


@pytest.mark.parametrize("bad", [3, 100, 0, 1])
def test_bad_blocks(bad):
    with pytest.raises(ValueError, match="block"):
        hadamard_transform(torch.randn(2, 128), bad)


def test_dim_not_divisible_and_full_without_construction():
    with pytest.raises(ValueError, match="not divisible by the Hadamard block 128"):
        hadamard_transform(torch.randn(2, 192), 128)
    # 184 = 8 * 23: no order 23 * 2^j has a construction here (92 needs Williamson's)
    with pytest.raises(ValueError, match="no Hadamard construction for block 184"):
        hadamard_transform(torch.randn(2, 184), "full")


# ---- Blocks that are not powers of two: H_n = H_m ⊗ H_p, H_m a Paley construction.

# Each real model's reduction dims (SmolLM2, Llama-2-7B, Llama-3-8B / Mistral-7B, Qwen2.5-0.5B,
# TinyLlama) -> (dense order m, power of two p), and how H_m is built.
REAL_DIMS = {
    576: (36, 16, "Paley II (q=17)"),
    1536: (12, 128, "Paley II (q=5)"),
    11008: (344, 32, "Paley I (q=343)"),
    14336: (28, 512, "Paley II (q=13)"),
    896: (28, 32, "Paley II (q=13)"),
    4864: (76, 64, "Paley II (q=37)"),
    5632: (44, 128, "Paley I (q=43)"),
}
# QuaRot's table (156 and 172 need Williamson constructions), the real dims' dense orders,
# and 100 = Paley II over GF(49).
DENSE_ORDERS = [12, 20, 28, 36, 44, 52, 60, 76, 100, 108, 140, 344]


def _orthonormal_error(h: torch.Tensor) -> float:
    return (h @ h.T - torch.eye(h.shape[0], dtype=h.dtype)).abs().max().item()


@pytest.mark.parametrize("q", [3, 7, 11, 19, 27, 43, 343])
def test_paley_i_over_prime_and_prime_power_fields(q):
    h = paley_i(q)
    assert np.array_equal(h @ h.T, (q + 1) * np.eye(q + 1))  # exact: integer entries
    assert np.array_equal(h + h.T, 2 * np.eye(q + 1))  # I + S, S skew: not symmetric


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 37, 49, 125])
def test_paley_ii_over_prime_and_prime_power_fields(q):
    h = paley_ii(q)
    assert np.array_equal(h @ h.T, 2 * (q + 1) * np.eye(2 * (q + 1)))
    assert np.array_equal(h, h.T)


@pytest.mark.parametrize("p,k", [(3, 2), (3, 3), (5, 2), (7, 2), (7, 3), (2, 4)])
def test_finite_field_arithmetic(p, k):
    q = p**k
    f = irreducible_polynomial(p, k)
    assert len(f) == k + 1 and f[-1] == 1
    if k <= 3:  # irreducible <=> no root
        assert all(sum(c * x**j for j, c in enumerate(f)) % p for x in range(p))
    elements = range(1, q)
    # GF(q)* is a group: every element has an inverse, and it is cyclic of order q - 1.
    assert all(any(field_multiply(a, b, p, k) == 1 for b in elements) for a in elements)
    orders = []
    for a in elements:
        x, n = a, 1
        while x != 1:
            x, n = field_multiply(x, a, p, k), n + 1
        orders.append(n)
    assert max(orders) == q - 1
    if p > 2:
        assert sorted(quadratic_character(q).tolist()) == [-1] * ((q - 1) // 2) + [0] + [1] * ((q - 1) // 2)


@pytest.mark.parametrize("m", DENSE_ORDERS)
def test_dense_orders_are_orthonormal(m):
    assert hadamard_factorization(m) == (m, 1)
    h = dense_hadamard(m)
    assert set(np.unique(h)) == {-1.0, 1.0} and np.array_equal(h @ h.T, m * np.eye(m))
    explicit = hadamard_matrix(m, torch.float64)
    assert _orthonormal_error(explicit) < 1e-12
    # the transform of the identity is the same matrix
    assert (hadamard_transform(torch.eye(m, dtype=torch.float64), m) - explicit).abs().max() < 1e-15


def test_orders_without_construction_and_largest_block():
    for n in (92, 156, 172, 6, 3, 184):
        assert not has_construction(n)
    assert has_construction(40) and hadamard_factorization(40) == (20, 2)
    assert largest_constructible_block(184) == 8 and largest_constructible_block(11008) == 11008
    assert largest_constructible_block(172) == 4 and largest_constructible_block(156) == 52 and largest_constructible_block(7) == 1


@pytest.mark.parametrize("dim", list(REAL_DIMS))
def test_real_model_dims_factor_as_dense_times_fast(dim, monkeypatch):
    m, p, how = REAL_DIMS[dim]
    assert hadamard_factorization(dim) == (m, p) and m <= 344
    assert describe(m) == how
    assert has_construction(dim) and QuantizerConfig(hadamard_block=dim).hadamard_block == dim
    # The cost structure: one m x m matrix along m; along p a dense p x p GEMM up to
    # DENSE_POWER_MAX (faster on the CPU than log2(p) stages of small ops), the butterfly beyond.
    butterflies, dense = [], []
    monkeypatch.setattr(hadamard, "_butterfly", lambda x, b: butterflies.append(b) or _butterfly(x, b))
    monkeypatch.setattr(hadamard, "_dense_factor", lambda *a: dense.append(a[0]) or hadamard._dense_factor_cached(*a))
    x = torch.randn(3, 2 * dim, dtype=torch.float64)
    y = hadamard_transform(x, dim)
    if p <= hadamard.DENSE_POWER_MAX:
        assert butterflies == [] and dense == [p, m]
    else:
        assert butterflies == [p] and dense == [m]
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    assert (hadamard_transform(y, dim, inverse=True) - x).abs().max() < 1e-12


@pytest.mark.parametrize("dim", list(REAL_DIMS))
def test_real_model_dims_sampled_rows_are_the_kronecker_matrix(dim):
    # 64 rows of the transform of the identity (the full n x n gram costs n^3: 14336^3 is
    # out of reach here; the full matrices are checked below for the smaller dims). The rows
    # must be rows of H_m ⊗ H_p / sqrt(n), built here from numpy, and orthonormal.
    m, p, _ = REAL_DIMS[dim]
    rows = torch.linspace(0, dim - 1, 64).long()
    unit = torch.zeros(64, dim, dtype=torch.float64).index_put_((torch.arange(64), rows), torch.tensor(1.0, dtype=torch.float64))
    got = hadamard_transform(unit, "full")
    hm, hp = dense_hadamard(m), sylvester(p)
    want = np.stack([np.kron(hm[i // p], hp[i % p]) for i in rows.tolist()]) / dim**0.5
    assert (got - torch.from_numpy(want)).abs().max() < 1e-15
    assert _orthonormal_error(got) < 1e-12


@pytest.mark.parametrize("dim", [576, 896, 1536, pytest.param(4864, marks=pytest.mark.slow), pytest.param(5632, marks=pytest.mark.slow)])
def test_real_model_dims_full_matrix_is_orthonormal(dim):
    h = hadamard_matrix(dim, torch.float64)
    assert _orthonormal_error(h) < 1e-12
    t = hadamard_transform(torch.eye(dim, dtype=torch.float64), "full")  # the transform of the identity
    assert (t - h).abs().max() < 1e-15
    assert _orthonormal_error(t) < 1e-12


def test_paley_i_block_is_not_symmetric_and_inverse_transposes():
    # 88 = H_44 (Paley I, q=43) ⊗ H_2: applying H twice is not the identity; H then H^T is.
    x = torch.randn(4, 176, dtype=torch.float64)
    y = hadamard_transform(x, 88)
    h = hadamard_matrix(88, torch.float64)
    assert not torch.equal(h, h.T)
    assert (hadamard_transform(y, 88) - x).abs().max() > 0.1
    assert (hadamard_transform(y, 88, inverse=True) - x).abs().max() < 1e-12
    assert (hadamard_transform(x, 88, inverse=True) - x @ torch.block_diag(h.T, h.T)).abs().max() < 1e-12
    # the gradient of x H is g H^T
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    hadamard_transform(xg, 88).backward(g)
    assert (xg.grad - hadamard_transform(g, 88, inverse=True)).abs().max() < 1e-12


def test_non_power_of_two_block_low_precision_and_batches():
    x = torch.randn(2, 3, 2 * 1536)
    ref = hadamard_transform(x.double(), 1536)
    out = hadamard_transform(x.bfloat16(), 1536)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert ((out.double() - ref).abs() / ref.abs().clamp_min(1e-3)).median() < 4e-3
    assert (hadamard_transform(x, 1536).double() - ref).abs().max() < 1e-5


def test_non_power_of_two_block_compiles_without_graph_breaks():
    # The factorization and the cached H_m are constants of the graph (no cached-function call).
    x = torch.randn(3, 96, requires_grad=True)
    compiled = torch.compile(lambda t: hadamard_transform(t, 12), backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    assert torch.allclose(out, hadamard_transform(x, 12), atol=1e-6, rtol=0)
    assert torch.allclose(x.grad, 2 * x, atol=1e-5)  # |x H|^2 = |x|^2


def test_one_line_errors_name_dim_block_and_what_works():
    with pytest.raises(ValueError) as info:
        check_block(184, 184)
    assert str(info.value) == "last dim 184 has no Hadamard construction for block 184; the largest block that works is 8"
    with pytest.raises(ValueError, match="last dim 576 is not divisible by the Hadamard block 1536; the largest block that works is 576"):
        check_block(576, 1536)
    for bad in (6, 92, 0, True, "half"):
        with pytest.raises(ValueError, match=f"hadamard_block={bad!r} is not allowed") as info:
            QuantizerConfig(hadamard_block=bad)
        assert "\n" not in str(info.value)
    assert QuantizerConfig(hadamard_block=12).hadamard_block == 12  # 12 = Paley II over GF(5)


@pytest.mark.parametrize("dim", [576, 1536])
def test_sixteen_bit_rotated_linear_is_the_plain_linear(dim):
    # (x H)(W H)^T = x W^T needs H orthogonal only, not symmetric: exact up to float64 rounding.
    torch.manual_seed(dim)
    cfg = QuantizerConfig(bits=16, rotation="hadamard", hadamard_block="full")
    lin = nn.Linear(dim, 24, dtype=torch.float64)
    x = torch.randn(5, dim, dtype=torch.float64)
    assert torch.allclose(QuantLinear.from_linear(lin, cfg, cfg)(x), lin(x), atol=1e-12, rtol=0)
    model = nn.Sequential(nn.Linear(dim, dim, dtype=torch.float64), nn.ReLU(), nn.Linear(dim, 8, dtype=torch.float64))
    plain = model(x)
    assert quantize_model(model, cfg, cfg) == ["0", "2"]
    assert torch.allclose(model(x), plain, atol=1e-12, rtol=0)


def test_hf_export_rotates_back_with_the_transpose():
    # A 16-bit weight exported "quantized" is Q(W H) H^T = W; with H (Paley I, not symmetric) it
    # would not be.
    from qat.hf.export import quantized_weight

    cfg = QuantizerConfig(bits=16, rotation="hadamard", hadamard_block="full")
    layer = QuantLinear.from_linear(nn.Linear(88, 8, bias=False, dtype=torch.float64), cfg, cfg)
    assert (quantized_weight("w", layer) - layer.weight).abs().max() < 1e-12


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (conftest)


@pytest.mark.parametrize("block,shape", [(12, (4, 96)), ("full", (3, 192))])
def test_triton_equals_torch_for_a_non_power_of_two_block(block, shape):
    # The fused path rotates with hadamard_transform first and quantizes unrotated.
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(7)
    x, g = (torch.randn(shape, generator=gen).to(TRITON_DEVICE) for _ in range(2))
    base = dict(bits=4, hadamard_block=block)
    outs = []
    for backend in ("triton", "torch"):
        xi = x.clone().requires_grad_(True)
        q = Quantizer(QuantizerConfig(**base, backend=backend))
        out = q(xi)
        (out * g).sum().backward()
        codes = (fused_fake_quantize if backend == "triton" else fake_quantize)(x, q.cfg, q.grid).codes
        outs.append((out.detach(), xi.grad, codes))
    (v_fused, g_fused, c_fused), (v_torch, g_torch, c_torch) = outs
    assert torch.equal(c_fused, c_torch)
    torch.testing.assert_close(v_fused, v_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_torch, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_packed_export_round_trip_with_a_non_power_of_two_dim(tmp_path):
    # debug-xs with hadamard_block "full": mlp.down rotates its 384 inputs by H_12 ⊗ H_32.
    from test_packed import TOL_FP64, build_fake_quant, export_and_load, layer_inputs, max_rel_error, quantized_layers

    from qat.packed.linear import PackedLinear

    cfg = {"bits": 4, "hadamard_block": "full"}
    fake = build_fake_quant(cfg, cfg)
    assert fake.layers[0].mlp.down.in_features == 384 and hadamard_factorization(384) == (12, 32)
    packed = export_and_load(fake, tmp_path)
    prompt = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    layers = quantized_layers(fake)
    for name, x in layer_inputs(fake, prompt, QuantLinear).items():
        got = packed.get_submodule(name)
        assert isinstance(got, PackedLinear)
        assert torch.equal(got.dequantized_weight(), layers[name].weight_quantizer(layers[name].weight)), name
        assert max_rel_error(got(x), layers[name](x)) < TOL_FP64, name
    assert max_rel_error(packed(prompt), fake(prompt)) < TOL_FP64
