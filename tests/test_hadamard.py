import pytest
import torch

from qat.quant.hadamard import _butterfly, hadamard_matrix, hadamard_transform


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


def test_dim_not_divisible_and_full_non_power_of_two():
    with pytest.raises(ValueError, match="not divisible by the Hadamard block 128"):
        hadamard_transform(torch.randn(2, 192), 128)
    with pytest.raises(ValueError, match="block=192"):
        hadamard_transform(torch.randn(2, 192), "full")
