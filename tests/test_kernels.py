"""Fused Triton kernels == the torch path of qat.Quantizer (forward codes, mask, values, scales; backward).

Without CUDA the kernels run in Triton's CPU interpreter on fp32 (its bf16 arithmetic is
not faithful); TRITON_INTERPRET must be set before the kernels are first built. With CUDA
the same tests run compiled on the GPU, and the `gpu`-marked tests add bf16/fp16 and
training-sized shapes.

Codes and masks are compared exactly, except at elements whose reference value lies
within a few fp32 ulps (one ulp of x's dtype for bf16/fp16, whose rotated values are
rounded to it) of a decision boundary (a rounding midpoint, the trust radius, the clip
level): there a differently ordered fp32 sum (matmul vs butterfly, tensor-core
accumulation) legitimately decides either way. Such exceptions are counted and bounded
(<= 1e-4 of the elements); the CPU tests meet one in ~140 comparisons (an 8-bit trust mask).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first built
DEVICE = "cpu" if INTERPRET else "cuda"

from qat.kernels.plan import MAX_FUSED_BLOCK  # noqa: E402
from qat.kernels.plan import kronecker_split, tiling_for  # noqa: E402
from qat import Quantizer, QuantizerConfig, fake_quantize, hadamard_matrix, make_grid, round_to_grid  # noqa: E402
from qat.quant.fused import fused_fake_quantize, kernel_scalars  # noqa: E402
from qat.quant.quantizer import rotate as reference_rotate  # noqa: E402

ALL_BITS = [1, 1.58, 2, 3, 4, 5, 6, 7, 8]
ESTIMATORS = ["trust", "ste", "clip"]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fused_quantize_rows(x: torch.Tensor, cfg: QuantizerConfig, with_codes: bool = True):
    """The fused path (through the config bridge), per-row scale as [...]."""
    qz = fused_fake_quantize(x, cfg, make_grid(cfg.bits, cfg.grid), with_codes=with_codes)
    return qz._replace(scale=qz.scale.squeeze(-1))


fused_quantize = fused_quantize_rows


def reference_quantize(x: torch.Tensor, cfg: QuantizerConfig):
    """The reference: the library's own torch path, `fake_quantize`."""
    qz = fake_quantize(x, cfg)
    return qz._replace(scale=qz.scale.squeeze(-1))


def scalars_for(cfg: QuantizerConfig):
    return kernel_scalars(cfg, make_grid(cfg.bits, cfg.grid))


def _cfg(**kw) -> QuantizerConfig:
    return QuantizerConfig(**{"backend": "torch", **kw})


def _input(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails (a few outliers per row) so that clipping and the trust mask both bite.
    x = torch.randn(shape, generator=g) * torch.exp(0.5 * torch.randn(shape, generator=g))
    return x.to(device=DEVICE, dtype=dtype)


def assert_matches(fused, x: torch.Tensor, cfg: QuantizerConfig, max_tie_fraction: float = 1e-4) -> int:
    """fused (FusedQuantized) against the qat reference; returns the number of boundary ties."""
    ref = reference_quantize(x, cfg)
    xr = reference_rotate(x, cfg).double()
    # A few fp32 ulps; for half inputs one ulp of x's dtype (the rotated values are rounded
    # to it, and a differently ordered sum can round one of them the other way).
    eps = 8 * torch.finfo(torch.float32).eps if x.dtype == torch.float32 else 2 * torch.finfo(x.dtype).eps
    consts = scalars_for(cfg)
    s = ref.scale.double()[..., None]
    rms = s / consts.scale_factor
    u = (xr / s).clamp(-1, 1) * consts.center + consts.center + 0.5  # floor(u) is the code
    code_tie = (u - u.round()).abs() <= eps * u.abs().clamp_min(1)
    code_diff = fused.codes != ref.codes
    assert not (code_diff & ~code_tie).any(), f"{int((code_diff & ~code_tie).sum())} codes differ away from a boundary"
    assert int((fused.codes - ref.codes).abs().max()) <= 1
    if cfg.estimator == "trust":
        q = (ref.codes.double() - consts.center) * (s / consts.center)
        mask_tie = ((q - xr).abs() - consts.trust * rms).abs() <= eps * rms
    elif cfg.estimator == "clip":
        mask_tie = (xr.abs() - consts.clip * s).abs() <= eps * s
    else:
        mask_tie = torch.zeros_like(code_tie)
    mask_diff = fused.grad_mask != ref.grad_mask
    assert not (mask_diff & ~mask_tie & ~code_diff).any(), "masks differ away from a boundary"
    # Equal codes: values agree to the scale's rounding (plus x's dtype rounding of the value).
    same = ~code_diff
    err = (fused.value.double() - ref.value.double()).abs()
    bound = eps * (s + ref.value.double().abs())
    assert (err <= bound)[same].all(), f"value error {float(err[same].max()):.3g}"
    torch.testing.assert_close(fused.scale, ref.scale, rtol=eps, atol=0)
    ties = int((code_diff | mask_diff).sum())
    assert ties <= max_tie_fraction * x.numel() + 1, f"{ties} boundary ties in {x.numel()} elements"
    return ties


def _grid_configs():
    for bits in ALL_BITS:
        for grid in ("int", "int_zero"):
            if not (grid == "int_zero" and bits == 1):
                yield bits, grid


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
@pytest.mark.parametrize("bits,grid", list(_grid_configs()))
def test_forward_every_grid_and_estimator(bits, grid, rotation):
    x = _input((6, 5, 256), seed=int(bits * 100))
    for estimator in ESTIMATORS:
        cfg = _cfg(bits=bits, grid=grid, estimator=estimator, rotation=rotation, **({"clip_scale": 0.8} if estimator == "clip" else {}))
        assert_matches(fused_quantize_rows(x, cfg), x, cfg)


# (rows, K, hadamard_block). Row blocks hold 8192 values (64 rows at K = 128, 8 rows at
# K >= 1024, 8192 / b rows for blocks b > 128); row counts are off those multiples, and some
# span more row blocks than the interpreter's two programs, so that programs loop.
SHAPES = [
    (150, 128, 128),
    (5, 256, 128),
    (9, 512, 128),
    (21, 1024, 128),
    (3, 4096, 128),
    (19, 1664, 128),  # the 430M model's width: 13 blocks, two tiles, the last one partial
    (7, 200, 8),  # block < 16 (blockdiag of H_8), K not a multiple of the 128-column tile
    (5, 192, 64),
    (3, 128, 2),
    (70, 256, 256),
    (9, 1024, 512),
    (3, 1024, "full"),
    (4, 4096, 1024),
    (5, 4096, "full"),
    (2, 8192, 2048),
]


@pytest.mark.parametrize("rows,dim,block", SHAPES)
def test_forward_shapes(rows, dim, block):
    x = _input((rows, dim), seed=dim + rows)
    for estimator, bits in (("trust", 4), ("clip", 2)):
        cfg = _cfg(bits=bits, hadamard_block=block, estimator=estimator)
        assert_matches(fused_quantize_rows(x, cfg), x, cfg)


@pytest.mark.parametrize("dim", [100, 1664, 3000])
def test_forward_no_rotation_any_width(dim):
    x = _input((5, dim), seed=dim)
    cfg = _cfg(bits=3, rotation="none")
    assert_matches(fused_quantize_rows(x, cfg), x, cfg)


def test_block_beyond_the_fused_limit_rotates_first():
    dim = 2 * MAX_FUSED_BLOCK
    x = _input((2, dim), seed=3)
    cfg = _cfg(bits=4, hadamard_block="full")
    assert_matches(fused_quantize_rows(x, cfg), x, cfg)


@pytest.mark.parametrize("estimator", ["ste", "clip"])
@pytest.mark.parametrize("bits,grid", [(1, "int"), (1.58, "int_zero"), (4, "int"), (8, "int_zero")])
def test_rounding_is_bit_exact_given_the_scale(bits, grid, estimator):
    # Without rotation the kernel sees the very same fp32 values, so with its own per-row
    # scale round_to_grid must reproduce codes, values and the clip mask bit for bit.
    x = _input((9, 1024), seed=7)
    cfg = _cfg(bits=bits, grid=grid, estimator=estimator, rotation="none")
    fused = fused_quantize_rows(x, cfg)
    q, codes = round_to_grid(x, fused.scale[:, None], make_grid(bits, grid))
    assert torch.equal(fused.codes, codes)
    assert torch.equal(fused.value, q)
    if estimator == "clip":
        assert torch.equal(fused.grad_mask, x.abs() <= cfg.clip_scale * fused.scale[:, None])


BACKWARD_CASES = [  # (estimator, rotation, block, shape)
    ("trust", "hadamard", 128, (2, 3, 256)),
    ("ste", "hadamard", 128, (5, 384)),
    ("clip", "hadamard", 32, (4, 256)),
    ("trust", "hadamard", 512, (3, 1024)),
    ("trust", "hadamard", "full", (2, 4096)),
    ("clip", "none", 128, (6, 1664)),
    ("trust", "hadamard", 128, (19, 1664)),
    ("trust", "hadamard", 128, (3, 50, 128)),
    ("clip", "hadamard", "full", (2, 2 * MAX_FUSED_BLOCK)),  # rotated by qat first, then fused
]


@pytest.mark.parametrize("estimator,rotation,block,shape", BACKWARD_CASES)
def test_quantizer_backend_triton_equals_torch(estimator, rotation, block, shape):
    base = dict(bits=4, estimator=estimator, rotation=rotation)
    base.update({"hadamard_block": block} if rotation == "hadamard" else {})
    base.update({"clip_scale": 0.9} if estimator == "clip" else {})
    fused, torch_path = Quantizer(dict(base, backend="triton")), Quantizer(dict(base, backend="torch"))
    x = _input(shape, seed=11)
    g = _input(shape, seed=12)
    grads = []
    for quantizer in (fused, torch_path):
        xi = x.clone().requires_grad_(True)
        out = quantizer(xi)
        (out * g).sum().backward()
        grads.append((out.detach(), xi.grad))
    (v_fused, g_fused), (v_torch, g_torch) = grads
    assert v_fused.dtype == x.dtype and v_fused.shape == x.shape
    torch.testing.assert_close(v_fused, v_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_torch, rtol=1e-5, atol=1e-5)


def test_backward_is_the_rotated_masked_gradient():
    # d value / d x = H (g ⊙ mask): check against the explicit orthonormal matrix in float64.
    cfg = _cfg(bits=2, hadamard_block=64, estimator="trust")
    x = _input((4, 256), seed=5).requires_grad_(True)
    g = _input((4, 256), seed=6)
    qz = fused_quantize(x, cfg)
    (grad,) = torch.autograd.grad(qz.value, x, g)
    h = torch.block_diag(*[hadamard_matrix(64, torch.float64)] * 4)
    expected = (g.double() * qz.grad_mask) @ h.T
    assert 0 < qz.grad_mask.float().mean() < 1
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_compiled_equals_eager():
    cfg = _cfg(bits=4, hadamard_block=128, estimator="trust")
    grid = make_grid(cfg.bits, cfg.grid)  # held by the Quantizer, outside the compiled region

    def loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (fused_fake_quantize(x, cfg, grid, with_codes=False).value @ w).square().sum()

    x = _input((8, 256), seed=1)
    w = _input((256, 16), seed=2)
    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        xi = x.clone().requires_grad_(True)
        out = fn(xi, w)
        out.backward()
        results.append((out.detach(), xi.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


def test_outputs_and_options():
    x = _input((2, 3, 256), seed=4)
    full = fused_quantize(x, _cfg(bits=4, estimator="ste"))
    lean = fused_quantize(x, _cfg(bits=4, estimator="ste"), with_codes=False)
    assert lean.codes is None and torch.equal(lean.value, full.value)
    assert full.codes.dtype == torch.int32 and full.codes.shape == x.shape
    assert full.grad_mask.dtype == torch.bool and full.grad_mask.shape == x.shape and full.grad_mask.all()
    scale = fused_quantize_rows(x.requires_grad_(True), _cfg(bits=4)).scale
    assert scale.shape == (2, 3) and scale.dtype == torch.float32 and not scale.requires_grad
    empty = fused_quantize(x[:0], _cfg(bits=4))
    assert empty.value.shape == (0, 3, 256)


def test_bad_inputs_raise():
    x = _input((2, 256))
    with pytest.raises(ValueError, match="grid='gaussian'"):
        fused_quantize(x, _cfg(grid="gaussian"))
    with pytest.raises(ValueError, match="float64"):
        fused_quantize(x.double(), _cfg())
    with pytest.raises(ValueError, match="no Hadamard construction"):
        fused_quantize(_input((2, 184)), _cfg(hadamard_block="full"))
    with pytest.raises(ValueError, match="not divisible"):
        fused_quantize(_input((2, 200)), _cfg(hadamard_block=128))


def test_kronecker_split_reproduces_sylvester():
    for block in (256, 512, 1024, 2048):
        outer, inner = kronecker_split(block)
        assert outer * inner == block and 16 <= outer <= inner
        kron = torch.kron(hadamard_matrix(outer, torch.float64), hadamard_matrix(inner, torch.float64))
        assert torch.allclose(kron, hadamard_matrix(block, torch.float64), atol=1e-12)
    assert tiling_for(4096, 4096).outer > 1 and tiling_for(4096, 128).outer == 1  # two-stage Kronecker vs one matmul



_HOPPER_CHECK = """
import json
from qat.kernels.aot import APPROX_DIV, FMA, IEEE_DIV, WGMMA, Variant, compile_variant
out = []
for v in (Variant("forward", "bf16", 4608, 128), Variant("forward", "fp32", 1024, 4096, "clip", True),
          Variant("forward", "fp16", 256, 8, "ste"), Variant("backward", "bf16", 1664, 128)):
    c = compile_variant(v)
    out.append([v.kernel, c.count(WGMMA), c.count(IEEE_DIV), c.count(APPROX_DIV), c.count(FMA)])
print(json.dumps(out))
"""


@pytest.mark.slow  # subprocesses or compilation: out of the quick loop, in CI's suite
def test_kernels_compile_for_hopper_without_a_gpu():
    # The compiled path, checked where only the interpreter runs: it builds for sm_90 with
    # Triton's bundled ptxas, rotates on wgmma, divides with IEEE rounding and has no FMA
    # (the rounding must repeat torch's separate multiply and add).
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", _HOPPER_CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert run.returncode == 0, run.stderr[-2000:]
    for kernel, wgmma, ieee_div, approx_div, fma in json.loads(run.stdout.splitlines()[-1]):
        assert wgmma > 0 and approx_div == 0 and fma == 0
        assert (ieee_div > 0) == (kernel == "forward")


# ---- GPU only: half precision, training-sized shapes, inductor ----------------------------

GPU_SHAPES = [(4096, 128), (1664, 128), (4608, 128), (1024, 16), (4096, 1024), (8192, "full"), (16384, "full")]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim,block", GPU_SHAPES)
def test_gpu_forward_matches_torch(dtype, dim, block):
    x = _input((max(8, 2**22 // dim) + 3, dim), dtype=dtype, seed=dim)
    for estimator in ESTIMATORS:
        cfg = _cfg(bits=4, hadamard_block=block, estimator=estimator)
        assert_matches(fused_quantize_rows(x, cfg), x, cfg)
    for bits, grid in ((1, "int"), (1.58, "int_zero"), (8, "int")):
        cfg = _cfg(bits=bits, grid=grid, hadamard_block=block)
        assert_matches(fused_quantize_rows(x, cfg), x, cfg)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim,block", GPU_SHAPES)
def test_gpu_backward_is_the_rotated_masked_gradient(dtype, dim, block):
    from qat import hadamard_transform

    cfg = _cfg(bits=4, hadamard_block=block, estimator="trust")
    x = _input((4096, dim), dtype=dtype, seed=1).requires_grad_(True)
    g = _input((4096, dim), dtype=dtype, seed=2)
    qz = fused_quantize(x, cfg, with_codes=False)
    (grad,) = torch.autograd.grad(qz.value, x, g)
    # The torch path's backward applied to the kernel's own mask (masks are compared above).
    expected = hadamard_transform((g.float() * qz.grad_mask).to(dtype), cfg.block_for(dim))
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, expected, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@gpu
@needs_cuda
def test_gpu_inductor_compiled_equals_eager():
    cfg = _cfg(bits=4, hadamard_block=128)

    def loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (fused_quantize(x, cfg, with_codes=False).value.float() * w).sum()

    x = _input((1024, 4096), dtype=torch.bfloat16, seed=3)
    w = _input((1024, 4096), seed=4)
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        xi = x.clone().requires_grad_(True)
        out = fn(xi, w)
        out.backward()
        results.append((out.detach(), xi.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


@gpu
@needs_cuda
def test_gpu_quantized_model_step_triton_equals_torch():
    import torch.nn.functional as F

    from qat.models.llama import Llama
    from qat.models.sizes import llama_config
    from qat import quantize_model

    losses, grads = [], []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = Llama(llama_config("debug-l", vocab_size=512)).cuda()
        cfg = QuantizerConfig(bits=4, backend=backend)
        quantize_model(model, weight=cfg, activation=cfg)
        idx = torch.randint(0, 512, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=0)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
