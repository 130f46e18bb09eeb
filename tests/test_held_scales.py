"""Stored weight scales (`scale_update: frozen | learned`): fitted once and kept with the weight,
or trained (range learning). The first forward equals the refitted one bit for bit; a frozen
scale no longer follows the weight; a learned one gets LSQ's step gradient (closed form, float64);
GPTQ's codes survive exactly (float32, with and without a rotation); checkpoints, `init_from`
and the optimizer's decay groups treat the scale as quantizer state."""

import pytest
import torch

from qat import QuantizerConfig, make_grid, quantize_model
from qat.quant.estimators import lsq_grad_scale
from qat.quant.linear import QuantLinear, set_held_scales
from qat.quant.quantizer import fake_quantize
from qat.train.optim import decay_groups

pytestmark = pytest.mark.usefixtures("one_thread")

Q4_0 = dict(bits=4, rotation="none", grid="int_zero", granularity=32, scale="absmax", scale_dtype="float16")
CONFIGS = {
    "q4_0": Q4_0,
    "quest-row": dict(bits=4, hadamard_block=32),
    "mse_search-group16-rotated": dict(bits=3, hadamard_block=16, granularity=16, scale="mse_search", estimator="ste"),
    "gaussian-grid": dict(bits=2, rotation="none", grid="gaussian", scale="absmax", estimator="clip"),
}


def layer(weight: dict, update: str, dtype=torch.float32, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    rotation = weight.get("rotation", "hadamard")
    side = {"bits": 16, "rotation": rotation, **({"hadamard_block": weight.get("hadamard_block", 128)} if rotation == "hadamard" else {})}
    out = QuantLinear(64, 24, bias=False, weight_config={**weight, "scale_update": update}, input_config=side)
    return out.to(dtype)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("update", ["frozen", "learned"])
def test_first_forward_equals_the_refitted_one_bit_for_bit(name, update):
    held, refit = layer(CONFIGS[name], update), layer(CONFIGS[name], "refit")
    x = torch.randn(5, 64)
    assert torch.equal(held(x), refit(x))
    assert bool(held.weight_quantizer.scale_initialized)
    a, b = held.weight_quantizer.quantize(held.weight), refit.weight_quantizer.quantize(refit.weight)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_a_frozen_scale_stays_where_a_refitted_one_follows_the_weight():
    held, refit = layer(Q4_0, "frozen"), layer(Q4_0, "refit")
    held.quantized_weight(), refit.quantized_weight()
    stored = held.weight_quantizer.scale.clone()
    with torch.no_grad():
        for lin in (held, refit):
            lin.weight.mul_(1.5)
    assert torch.equal(held.weight_quantizer.scale, stored)
    assert torch.equal(held.weight_quantizer.quantize(held.weight).scale.reshape(stored.shape), stored)
    assert not torch.equal(refit.weight_quantizer.quantize(refit.weight).scale.reshape(stored.shape), stored)
    # 1.5x the weight at the old absmax: the outer third of every group is now clipped.
    clipped = (held.weight_quantizer.quantize(held.weight).value.abs() >= stored.reshape(24, 2, 1).expand(24, 2, 32).reshape(24, 64) * (1 - 1e-6))
    assert clipped.float().mean() > 0.2


@pytest.mark.parametrize("estimator", ["ste", "trust"])
def test_a_learned_scale_gets_lsqs_step_gradient(estimator):
    """Closed form, float64: dL/ds_g = gs * sum over the group of dL/dq * ((q - x) / s inside,
    q / s outside), gs = 1 / sqrt(g * Q_p); the weight's gradient is the estimator's own."""
    cfg = dict(bits=4, rotation="none", grid="int_zero", granularity=16, scale="absmax", estimator=estimator)
    held, refit = layer(cfg, "learned", torch.float64), layer(cfg, "refit", torch.float64)
    set_held_scales(held)
    with torch.no_grad():
        held.weight_quantizer.scale.mul_(0.8)  # some weights now lie beyond the range
    upstream = torch.randn(24, 64, dtype=torch.float64)
    (held.weight_quantizer(held.weight) * upstream).sum().backward()

    w, s = held.weight.detach().reshape(24, 4, 16), held.weight_quantizer.scale.detach()  # [24, 4, 1]
    center = 7
    q = torch.clamp(torch.round(w / s * center), -center, center) * s / center
    inside = w.abs() <= s
    dq_ds = torch.where(inside, (q - w) / s, q / s)
    expected = (upstream.reshape(24, 4, 16) * dq_ds).sum(-1, keepdim=True) / (16 * center) ** 0.5
    assert lsq_grad_scale(16, make_grid(4, "int_zero")) == pytest.approx(1 / (16 * center) ** 0.5)
    torch.testing.assert_close(held.weight_quantizer.scale.grad, expected, rtol=1e-12, atol=1e-12)
    # The weight's gradient: the estimator's mask, as with any other scale at this value.
    x = held.weight.detach().clone().requires_grad_(True)
    frozen_cfg = QuantizerConfig(**cfg)
    (fake_quantize(x, frozen_cfg, make_grid(4, "int_zero"), s.clone()).value * upstream).sum().backward()
    torch.testing.assert_close(held.weight.grad, x.grad, rtol=0, atol=0)


def test_a_learned_scale_trains_without_weight_decay():
    lin = layer(Q4_0, "learned")
    set_held_scales(lin)
    groups = decay_groups(lin, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(lin.weight) in decayed and id(lin.weight_quantizer.scale) not in decayed
    before = lin.weight_quantizer.scale.detach().clone()
    opt = torch.optim.AdamW(groups, lr=1e-3)
    x, y = torch.randn(32, 64), torch.randn(32, 24)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(lin(x), y).backward()
        opt.step()
    assert not torch.equal(lin.weight_quantizer.scale, before)


def test_state_dict_keeps_the_scale_and_a_fresh_layer_reproduces_the_codes():
    held = layer(Q4_0, "frozen")
    set_held_scales(held)
    with torch.no_grad():
        held.weight.add_(torch.randn_like(held.weight) * 0.01)
    codes = held.weight_quantizer.quantize(held.weight).codes
    fresh = layer(Q4_0, "frozen", seed=1)
    fresh.load_state_dict(held.state_dict())
    assert torch.equal(fresh.weight_quantizer.quantize(fresh.weight).codes, codes)
    assert set(held.state_dict()) == {"weight", "weight_quantizer.scale", "weight_quantizer.scale_initialized"}


@pytest.mark.parametrize(
    "weight, activation, message",
    [
        (dict(bits=4, scale_update="frozen"), dict(bits=4, scale_update="frozen"), "scale_update='frozen' is for weights"),
        (dict(bits=4, scale="lsq", estimator="lsq", scale_update="learned"), None, "not allowed with scale='lsq'"),
        (dict(bits=4, rotation="none", asymmetric=True, scale="absmax", scale_update="frozen"), None, "not allowed with asymmetric=true"),
        (dict(bits=4, scale_update="sometimes"), None, "scale_update='sometimes' is not allowed; choose one of 'refit', 'frozen', 'learned'"),
    ],
)
def test_bad_choices_are_refused_in_one_line(weight, activation, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        QuantLinear(64, 8, weight_config=weight, input_config=activation)
    assert "\n" not in str(err.value)


def _tiny_llama(weight: dict, rotation: str):
    from qat.models.llama import Llama
    from qat.models.sizes import llama_config

    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=60, max_seq_len=32))
    side = {"hadamard_block": weight.get("hadamard_block", 128)} if rotation == "hadamard" else {}
    quantize_model(net, QuantizerConfig(**weight), QuantizerConfig(bits=16, rotation=rotation, **side))
    return net


@pytest.mark.parametrize("weight", [Q4_0, dict(bits=4, hadamard_block=16), dict(bits=3, hadamard_block=16, granularity=16, scale="mse_search")], ids=["q4_0", "quest", "mse_search-g16"])
def test_gptq_with_a_stored_scale_keeps_its_codes_exactly(weight, tmp_path):
    """Float32, as training stores the latent: with `frozen` the forward reproduces every code
    GPTQ chose (refitted: 87-98% on these layers), its output error is lower, and the codes
    survive a checkpoint and `init_from` into a fresh model."""
    from qat.ptq.calibration import gptq_model
    from qat.train.checkpoint import load_initial_weights, write_model_checkpoint

    rotation = weight.get("rotation", "hadamard")
    batches = [torch.randint(0, 60, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    refit = gptq_model(_tiny_llama(weight, rotation), batches, log=lambda _: None)
    net = _tiny_llama({**weight, "scale_update": "frozen"}, rotation)
    kept = gptq_model(net, batches, log=lambda _: None)
    assert all(r.code_agreement == 1.0 for r in kept)
    assert min(r.code_agreement for r in refit) < 1.0
    assert sum(r.output_error_gptq for r in kept) < sum(r.output_error_gptq for r in refit)
    assert all(r.output_error_gptq < r.output_error_rtn for r in kept)

    codes = {n: m.weight_quantizer.quantize(m.weight).codes for n, m in net.named_modules() if isinstance(m, QuantLinear)}
    write_model_checkpoint(tmp_path / "gptq.ckpt", net, {"note": "test"})
    fresh = _tiny_llama({**weight, "scale_update": "learned"}, rotation)
    load_initial_weights(fresh, tmp_path / "gptq.ckpt")
    assert set_held_scales(fresh) == []  # every scale came from the checkpoint
    for name, m in fresh.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.weight_quantizer.quantize(m.weight).codes, codes[name]), name


def test_bench_scale_fit_times_every_arm(tmp_path):
    """scripts/bench_scale_fit.py on debug-xs: one row per arm in order, the first the reference,
    and the per-forward search (101 roundings of every weight) slower than a stored scale."""
    import json

    from test_fuzz_scripts import script_main

    argv = ["--model", "debug-xs", "--arms", "absmax:refit", "mse_search:refit", "absmax:frozen", "mse_search:learned",
            "--rounds", "2", "--step-seconds", "2.0", "--out", str(tmp_path / "out")]  # fmt: skip
    assert script_main("bench_scale_fit")(argv) == 0
    report = json.loads((tmp_path / "out" / "bench_scale_fit.json").read_text())
    rows = {r["arm"]: r for r in report["rows"]}
    assert list(rows) == ["absmax:refit", "mse_search:refit", "absmax:frozen", "mse_search:learned"]
    assert all(len(r["rounds"]) == 2 and r["seconds"] > 0 for r in rows.values())
    assert rows["mse_search:refit"]["seconds"] > rows["absmax:frozen"]["seconds"]
    assert report["layers"] == 5 and report["step_seconds"] == 2.0  # debug-xs: one block of 5 linears
    assert "| absmax:refit |" in (tmp_path / "out" / "bench_scale_fit.md").read_text()
