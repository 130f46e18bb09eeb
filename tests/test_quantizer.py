import itertools
import math

import numpy as np
import pytest
import torch

from qat import Quantizer, QuantizerConfig, hadamard_transform, make_grid, optimal_gaussian_scale, quantization_mse
from qat.quant.estimators import lsq_grad_scale
from qat.quant.grids import default_trust
from qat.quant.quantizer import fake_quantize

GRID_BITS = [(g, b) for g in ("int", "int_zero", "gaussian") for b in (1, 1.58, 2, 3, 4, 5, 6, 7, 8) if not (g == "int_zero" and b == 1)]
GRID_BITS += [("fp4", 4)]


def _q(**kw):
    kw.setdefault("rotation", "none")
    return Quantizer(QuantizerConfig(**kw))


def test_mse_at_4_bits_within_3_percent_of_analytic_minimum():
    torch.manual_seed(0)
    x = torch.randn(256, 4096)
    q = _q(bits=4)(x)
    best = quantization_mse(optimal_gaussian_scale(4) * np.asarray(make_grid(4).levels))
    assert abs((q - x).square().mean().item() / best - 1) < 0.03


@pytest.mark.parametrize("grid,bits", GRID_BITS)
def test_outputs_lie_exactly_on_the_grid(grid, bits):
    torch.manual_seed(1)
    x = torch.randn(64, 256) * torch.rand(64, 1) * 3
    quant = _q(bits=bits, grid=grid, estimator="ste")
    q = quant(x)
    g = make_grid(bits, grid)
    rms = x.square().mean(-1, keepdim=True).sqrt()
    s = optimal_gaussian_scale(bits, grid) * rms
    levels = torch.tensor(g.levels)
    codes = (q.unsqueeze(-1) / s.unsqueeze(-1) - levels).abs().argmin(-1)
    assert torch.allclose(q, levels[codes] * s, atol=1e-6 * s.max().item(), rtol=0)
    # every value went to its nearest level (brute force over all levels, float64)
    brute = (x.double().unsqueeze(-1) - levels.double() * s.double().unsqueeze(-1)).abs().argmin(-1)
    assert (codes == brute).float().mean() > 0.9999
    assert len(torch.unique(codes)) <= g.size


def test_int_grid_is_quests_centered_grid():
    # 2 bits: +-0.5 step, +-1.5 step with step = 2 s / 3, no zero level
    g = make_grid(2, "int")
    assert np.allclose(g.levels, [-1, -1 / 3, 1 / 3, 1])
    assert make_grid(1.58, "int").levels == (-1.0, 0.0, 1.0)  # true ternary
    assert make_grid(4, "int_zero").size == 15 and 0.0 in make_grid(4, "int_zero").levels


def test_codes_match_quests_integer_form():
    torch.manual_seed(2)
    x = torch.randn(32, 128)
    from qat.quant.grids import round_to_grid

    s = optimal_gaussian_scale(4) * x.square().mean(-1, keepdim=True).sqrt()
    q, codes = round_to_grid(x, s, make_grid(4))
    step = 2 * s / 15
    k = torch.clamp(torch.floor(x / step), -8, 7)  # QuEST kernel form: q = (k + 1/2) step
    assert torch.allclose(q, (k + 0.5) * step, atol=1e-5)
    assert torch.equal(codes.long(), (k + 8).long())


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_trust_mask_is_exactly_where_the_error_is_small(rotation):
    torch.manual_seed(3)
    x = (torch.randn(16, 256) * torch.linspace(0.5, 4, 256)).requires_grad_()
    quant = Quantizer(QuantizerConfig(bits=2, rotation=rotation))
    y = quant(x)
    g = torch.randn_like(y)
    y.backward(g)
    xr = hadamard_transform(x.detach().double(), 128) if rotation == "hadamard" else x.detach().double()
    rms = xr.square().mean(-1, keepdim=True).sqrt()
    mask = (y.detach().double() - xr).abs() <= default_trust(2) * rms
    assert 0.01 < 1 - mask.double().mean() < 0.5  # the test exercises both sides
    expected = g.double() * mask
    if rotation == "hadamard":
        expected = hadamard_transform(expected, 128)
    assert torch.allclose(x.grad.double(), expected, atol=1e-5)


def test_default_trust_equals_a_clip_at_n_over_n_minus_1():
    # inside [-s, s] the rounding error is at most half a step, so the default trust mask
    # is |x| <= s + step/2 (QuEST's equivalence)
    torch.manual_seed(4)
    x = torch.randn(8, 1024).requires_grad_()
    y = _q(bits=3)(x)
    y.sum().backward()
    s = optimal_gaussian_scale(3) * x.detach().square().mean(-1, keepdim=True).sqrt()
    far = (x.detach().abs() - s * 8 / 7).abs() > 1e-4 * s
    assert torch.equal((x.grad != 0)[far], (x.detach().abs() <= s * 8 / 7)[far])


def test_ste_passes_identity_and_clip_passes_inside_range():
    x = (torch.randn(8, 128) * 3).requires_grad_()
    g = torch.randn(8, 128)
    _q(bits=2, estimator="ste")(x).backward(g)
    assert torch.equal(x.grad, g)
    x.grad = None
    _q(bits=2, estimator="clip", clip_scale=1.3)(x).backward(g)
    s = optimal_gaussian_scale(2) * x.detach().square().mean(-1, keepdim=True).sqrt()
    assert torch.equal(x.grad, g * (x.detach().abs() <= 1.3 * s))


@pytest.mark.parametrize("grid", ["int", "int_zero", "gaussian"])
def test_lsq_scale_gradient_matches_finite_differences(grid):
    # LSQ differentiates q = s * level(x / s) treating the rounding residual (in units of
    # s) as fixed: d/ds [x + s * r] = r inside the range; clipped values q = +-s give +-1.
    torch.manual_seed(5)
    x = torch.randn(4, 256, dtype=torch.float64) * 1.5
    g = torch.randn(4, 256, dtype=torch.float64)
    quant = _q(bits=3, grid=grid, scale="lsq", estimator="lsq")
    quant.double()
    y = quant(x.requires_grad_())
    (y * g).sum().backward()
    s = quant.scale.detach().item()
    from qat.quant.grids import round_to_grid

    q0 = round_to_grid(x.detach(), torch.tensor(s, dtype=torch.float64), make_grid(3, grid))[0]
    inside = x.detach().abs() <= s
    residual = (q0 - x.detach()) / s  # frozen rounding residual in units of s

    def surrogate(scale):
        clipped = torch.sign(x.detach()) * scale * q0.abs().div(s)
        return torch.where(inside, x.detach() + scale * residual, clipped)

    eps = 1e-6
    fd = ((surrogate(s + eps) - surrogate(s - eps)) / (2 * eps) * g).sum()
    scale_factor = lsq_grad_scale(x.numel(), make_grid(3, grid))
    assert math.isclose(quant.scale.grad.item(), fd.item() * scale_factor, rel_tol=1e-6, abs_tol=1e-9)
    assert torch.equal(x.grad, g * inside)


def test_pact_clip_gradient_matches_finite_differences_and_input_gets_gradient():
    torch.manual_seed(6)
    x = torch.randn(4, 256, dtype=torch.float64) * 2
    g = torch.randn(4, 256, dtype=torch.float64)
    quant = _q(bits=2, scale="lsq", estimator="pact").double()
    (quant(x.requires_grad_()) * g).sum().backward()
    s = quant.scale.detach().item()
    eps = 1e-6
    clip = lambda a: torch.clamp(x.detach(), -a, a)  # noqa: E731
    fd = ((clip(s + eps) - clip(s - eps)) / (2 * eps) * g).sum().item()
    assert math.isclose(quant.scale.grad.item(), fd, rel_tol=1e-6)
    inside = x.detach().abs() <= s
    assert torch.equal(x.grad, g * inside) and inside.any()  # QuEST's PACT gave zero here


def test_learnable_scale_is_initialised_once_and_saved():
    quant = _q(bits=4, scale="lsq", estimator="lsq")
    x = torch.randn(16, 128)
    quant(x)
    first = quant.scale.item()
    assert math.isclose(first, optimal_gaussian_scale(4) * x.square().mean(-1).sqrt().mean().item(), rel_tol=1e-5)
    quant(x * 10)
    assert quant.scale.item() == first
    state = quant.state_dict()
    assert set(state) == {"scale", "scale_initialized"}
    other = _q(bits=4, scale="lsq", estimator="lsq")
    other.load_state_dict(state)
    assert torch.equal(other(x), quant(x))


def test_two_of_four_sparsity_and_its_gradient():
    torch.manual_seed(7)
    x = torch.randn(8, 256).requires_grad_()
    quant = Quantizer(QuantizerConfig(bits=4, sparsity="2:4", estimator="ste"))
    y = quant(x)
    xr = hadamard_transform(x.detach(), 128).reshape(8, -1, 4)
    kept = y.detach().reshape(8, -1, 4) != 0
    assert torch.equal(kept.sum(-1), torch.full((8, 64), 2))
    # the kept ones are the two largest magnitudes of the rotated values
    assert (xr.abs() * kept).sum(-1).ge(xr.abs().topk(2, -1).values.sum(-1) - 1e-6).all()
    g = torch.randn(8, 256)
    y.backward(g)
    assert torch.allclose(x.grad, hadamard_transform(g * kept.reshape(8, 256), 128), atol=1e-5)


def test_group_granularity_uses_one_scale_per_group():
    x = torch.randn(4, 256)
    x[:, :32] *= 100  # a loud group must not change the others' scale
    q = _q(bits=4, granularity=32)(x)
    ref = _q(bits=4)(x[:, 32:64])
    assert torch.equal(q[:, 32:64], ref)


def test_sixteen_bits_is_identity_or_pure_rotation():
    x = torch.randn(3, 256)
    assert torch.equal(_q(bits=16)(x), x)
    assert torch.allclose(Quantizer(QuantizerConfig(bits=16))(x), hadamard_transform(x), atol=0)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"bits": 0}, "bits=0"),
        ({"bits": 17}, "bits=17"),
        ({"bits": "x"}, "bits='x'"),
        ({"bits": True}, "bits=True"),
        ({"hadamard_block": 92}, "hadamard_block=92"),  # no Hadamard matrix of order 92 is constructed here
        ({"hadamard_block": "half"}, "hadamard_block='half'"),
        ({"grid": "nf4"}, "grid='nf4'"),
        ({"estimator": "magic"}, "estimator='magic'"),
        ({"scale": "max"}, "scale='max'"),
        ({"rotation": "random"}, "rotation='random'"),
        ({"sparsity": "1:4"}, "sparsity='1:4'"),
        ({"backend": "cuda"}, "backend='cuda'"),
        ({"granularity": 0}, "granularity=0"),
        ({"trust": -1.0}, "trust=-1.0"),
        ({"grid": "fp4", "bits": 3}, "grid='fp4'"),
        ({"grid": "int_zero", "bits": 1}, "int_zero"),
        ({"estimator": "lsq"}, "scale='lsq'"),
        ({"scale": "lsq"}, "estimator 'lsq' or 'pact'"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace("[", r"\[")) as info:
        QuantizerConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_runtime_shapes():
    with pytest.raises(ValueError, match="granularity=48 does not divide the last dim 128"):
        _q(granularity=48)(torch.randn(2, 128))
    with pytest.raises(ValueError, match="not divisible by the Hadamard block 128"):
        Quantizer(QuantizerConfig())(torch.randn(2, 192))
    with pytest.raises(ValueError, match="unknown quantizer field 'bitz'"):
        QuantizerConfig.from_mapping({"bitz": 4})


def test_every_estimator_composes_with_every_grid_and_rotation():
    x = torch.randn(4, 128)
    for est, grid, rot in itertools.product(["trust", "ste", "clip", "lsq", "pact"], ["int", "int_zero", "gaussian", "fp4"], ["none", "hadamard"]):
        scale = "lsq" if est in ("lsq", "pact") else "rms_mse"
        xr = x.clone().requires_grad_()
        Quantizer(QuantizerConfig(bits=4, grid=grid, rotation=rot, estimator=est, scale=scale))(xr).sum().backward()
        assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def test_config_choices_come_from_the_registries():
    from qat.quant.estimators import ESTIMATORS
    from qat.quant.grids import GRIDS
    from qat.quant.scales import SCALE_FITS

    for name in ESTIMATORS:
        learnable = name in ("lsq", "pact")
        QuantizerConfig(estimator=name, scale="lsq" if learnable else "rms_mse", rotation="none")
    for name in SCALE_FITS:
        QuantizerConfig(scale=name)
    for name in GRIDS:
        QuantizerConfig(grid=name, bits=4)
    with pytest.raises(ValueError, match=r"grid='nf4' is not allowed; choose one of 'int', 'int_zero', 'gaussian', 'fp4'"):
        QuantizerConfig(grid="nf4")
    with pytest.raises(ValueError, match=r"scale='max' is not allowed; choose one of 'rms_mse', 'absmax', 'mse_search', 'lsq'"):
        QuantizerConfig(scale="max")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(trust=0.5, estimator="ste"), "trust=0.5 is ignored with estimator='ste'"),
        (dict(clip_scale=1.3, estimator="trust"), "clip_scale=1.3 is ignored with estimator='trust'"),
        (dict(hadamard_block=64, rotation="none"), "hadamard_block=64 is ignored with rotation='none'"),
    ],
)
def test_fields_that_would_be_ignored_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantizerConfig(**fields)
    QuantizerConfig(bits=16, **{k: v for k, v in fields.items() if k != "hadamard_block"})  # 16 bits: no estimator runs



@pytest.mark.parametrize("bits, grid", [(4, "int_zero"), (8, "int_zero"), (3, "int"), (4, "gaussian")])
def test_float16_scales_make_every_value_an_exact_float16_step_times_an_integer(bits, grid):
    """scale_dtype='float16' (the GGUF presets): the unit step d is a float16 number, so the
    trained weights are what a Q4_0 / Q8_0 block stores, bit for bit."""
    from qat.quant.quantizer import fake_quantize

    cfg = QuantizerConfig(bits=bits, grid=grid, rotation="none", granularity=32, scale_dtype="float16")
    g = make_grid(bits, grid)
    q = fake_quantize(torch.randn(16, 128, dtype=torch.float64) * 0.05, cfg)
    unit = q.scale / (g.center if g.uniform else 1.0)
    assert torch.equal(unit, unit.to(torch.float16).to(unit.dtype))
    if g.uniform:
        codes = q.value.unflatten(-1, (-1, 32)) / unit + g.center  # (code - center) * d / d + center
        assert torch.equal(codes, codes.round())
    assert (fake_quantize(torch.randn(16, 128, dtype=torch.float64) * 0.05, QuantizerConfig(bits=bits, grid=grid, rotation="none", granularity=32)).scale != 0).all()


def test_float16_scales_are_refused_where_meaningless():
    with pytest.raises(ValueError, match="scale_dtype='bfloat16' is not allowed"):
        QuantizerConfig(scale_dtype="bfloat16")
    with pytest.raises(ValueError, match="scale_dtype='float16' is not allowed with scale='lsq'"):
        QuantizerConfig(scale="lsq", estimator="lsq", scale_dtype="float16")


def test_float16_scales_of_an_all_zero_group_stay_finite():
    from qat.quant.quantizer import fake_quantize

    x = torch.randn(4, 64)
    x[:, :32] = 0.0  # a whole Q4_0 block of zeros
    q = fake_quantize(x, QuantizerConfig(bits=4, grid="int_zero", rotation="none", granularity=32, scale_dtype="float16"))
    assert torch.isfinite(q.value).all() and torch.equal(q.value[:, :32], torch.zeros(4, 32))


# ---- the asymmetric (offset) grid: GGUF's Q4_1 -----------------------------------------------


def _asym(**kw) -> QuantizerConfig:
    return QuantizerConfig(**{"bits": 4, "rotation": "none", "grid": "int", "asymmetric": True, **kw})


@pytest.mark.parametrize("scale", ["rms_mse", "absmax"])
def test_offset_grid_values_are_code_times_step_plus_offset(scale):
    x = torch.randn(6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3 + 2.0
    for scale_dtype in ("float32", "float16"):
        q = fake_quantize(x, _asym(scale=scale, granularity=32, scale_dtype=scale_dtype))
        step, offset = q.scale / 7.5, q.offset  # [6, 2, 1]
        assert q.codes.min() >= 0 and q.codes.max() <= 15
        assert torch.equal(q.value, (q.codes.view(6, 2, 32).double() * step + offset).view(6, 64))
        if scale_dtype == "float16":
            assert torch.equal(step.half().double(), step) and torch.equal(offset.half().double(), offset)


def test_offset_grid_is_translation_equivariant_and_the_symmetric_grid_at_zero_mean():
    """rms_mse: the int grid centred on the row mean, half-range c(bits) x the centred RMS. A
    shift moves the grid with the data; on a zero-mean row it is QuEST's symmetric int grid."""
    x = torch.randn(8, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x - x.mean(-1, keepdim=True)
    asym = fake_quantize(x, _asym()).value
    sym = fake_quantize(x, QuantizerConfig(bits=4, rotation="none", grid="int")).value
    assert torch.allclose(asym, sym, atol=1e-12)
    assert torch.allclose(fake_quantize(x + 5.0, _asym()).value - 5.0, asym, atol=1e-12)


def test_offset_grid_absmax_spans_min_to_max_and_trust_masks_the_clipped():
    x = torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 1.0
    q = fake_quantize(x, _asym(scale="absmax"))
    assert torch.allclose(q.value.amin(-1), x.amin(-1), atol=1e-12) and torch.allclose(q.value.amax(-1), x.amax(-1), atol=1e-12)
    # rms_mse clips the tails; the trust estimator stops their gradient, STE passes everything
    w = (torch.randn(4, 256, generator=torch.Generator().manual_seed(3)) * 2 + 1).requires_grad_()
    fake_quantize(w, _asym()).value.sum().backward()
    trust_grad = w.grad.clone()
    w.grad = None
    fake_quantize(w, _asym(estimator="ste")).value.sum().backward()
    assert 0.9 < trust_grad.mean() < 1.0 and torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize(
    "kw",
    [
        {}, {"grid": "int_zero", "granularity": 32}, {"grid": "gaussian", "estimator": "ste"}, {"grid": "fp4", "estimator": "clip"},
        {"bits": 2, "sparsity": "2:4"}, {"bits": 1.58, "grid": "int_zero", "scale": "absmax"}, {"hadamard_block": 12},
        {"rotation": "none", "grid": "int", "asymmetric": True, "granularity": 32, "scale_dtype": "float16"},
        {"scale": "mse_search", "rotation": "none"},
    ],
    ids=["quest", "int_zero_g32", "gaussian_ste", "fp4_clip", "2bit_2of4", "ternary_absmax", "block12", "asymmetric", "mse_search"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_without_gradient_is_the_same_value_bit_for_bit(kw, dtype):
    """Decoding takes no gradient: the quantizer then skips the estimator (no mask, no
    straight-through function) and must compute training's value exactly."""
    cfg = QuantizerConfig(**{"bits": 4, **kw})
    x = (torch.randn(5, 384, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.1).to(dtype)
    trained = fake_quantize(x.requires_grad_(), cfg)
    lean = fake_quantize(x.detach(), cfg, with_gradient=False)
    assert lean.grad_mask is None and trained.grad_mask is not None
    assert torch.equal(lean.value, trained.value.detach()) and torch.equal(lean.codes, trained.codes)
    q = Quantizer(cfg)
    with torch.no_grad():
        assert torch.equal(q(x.detach()), trained.value.detach())
