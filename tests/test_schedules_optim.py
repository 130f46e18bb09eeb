import math

import pytest
import torch

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat import QuantizerConfig, quantize_model
from qat.train.optim import decay_groups
from qat.scaling.precision import precision_key
from qat.train.schedules import cosine_with_warmup, lr_scheduler, warmup_stable_decay


def test_cosine_matches_quests_one_cycle():
    # QuEST used torch's OneCycleLR(div_factor=100, final_div_factor=0.1, pct_start=0.1, cos)
    total, lr = 1000, 1e-3
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total, pct_start=0.1, anneal_strategy="cos", div_factor=100, final_div_factor=0.1, cycle_momentum=False
    )
    ours = []
    for step in range(total):
        assert math.isclose(opt.param_groups[0]["lr"], lr * cosine_with_warmup(step, total), rel_tol=1e-9, abs_tol=1e-12), step
        ours.append(cosine_with_warmup(step, total))
        opt.step()
        ref.step()
    assert ours[0] == pytest.approx(0.01) and max(ours) == pytest.approx(1.0)
    assert cosine_with_warmup(total - 1, total) == pytest.approx(0.1)


def test_wsd_shape():
    total = 100
    v = [warmup_stable_decay(s, total, warmup_fraction=0.1, decay_fraction=0.2) for s in range(total + 1)]
    assert v[0] == pytest.approx(0.01) and v[10] == 1.0 and v[79] == 1.0 and v[100] == 0.0
    assert all(a >= b for a, b in zip(v[80:], v[81:]))


def test_scheduler_errors():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    with pytest.raises(ValueError, match="scheduler.name='linear'"):
        lr_scheduler(opt, 10, name="linear")
    with pytest.raises(ValueError, match="total_steps=0"):
        lr_scheduler(opt, 0)


def test_decay_only_on_block_matmul_weights():
    model = Llama(llama_config("debug", vocab_size=64))
    cfg = QuantizerConfig(bits=4, scale="lsq", estimator="lsq")
    quantize_model(model, cfg, cfg)
    decay, no_decay = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decayed == sorted(f"layers.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down"))
    rest = {names[id(p)] for p in no_decay["params"]}
    assert {"embed.weight", "lm_head.weight", "norm.weight", "layers.0.attn.qkv.weight_quantizer.scale"} <= rest
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_precision_keys():
    q = QuantizerConfig
    assert precision_key(q(bits=16), q(bits=16)) == "bf16"
    assert precision_key(q(bits=4), q(bits=4)) == "w4a4"
    assert precision_key(q(bits=3), q(bits=16)) == "w3a16"
    assert precision_key(q(bits=4, grid="fp4"), q(bits=4, grid="fp4")) == "fp4"
    assert precision_key(q(bits=4, sparsity="2:4"), q(bits=4)) == "2:4"
    assert precision_key(q(bits=2, rotation="none"), q(bits=2, rotation="none")) == "w2a2-nohad"
    assert precision_key(q(bits=4, rotation="none", estimator="ste"), q(bits=4, rotation="none", estimator="ste")) == "w4a4-nohad-ste"
    assert precision_key(q(bits=1.58), q(bits=1.58)) == "w1.58a1.58"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _one_cycle(total: int, warmup_fraction: float) -> list[float]:
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1.0, total_steps=total, pct_start=warmup_fraction, anneal_strategy="cos", div_factor=100,
        final_div_factor=0.1, cycle_momentum=False,
    )  # fmt: skip
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if len(out) < total:
            ref.step()
    return out


@pytest.mark.parametrize("total, warmup_fraction", [(10, 0.1), (20, 0.05), (1, 1.0), (200, 0.005)])
def test_cosine_with_a_one_step_warmup_is_finite(total, warmup_fraction):
    """warmup_fraction * total = 1 divided by zero before (trainer.max_steps=10 with the default 0.1)."""
    values = [cosine_with_warmup(s, total, warmup_fraction) for s in range(total)]
    assert all(math.isfinite(v) for v in values) and values[0] == 1.0


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 400), warmup_fraction=st.floats(0.0, 1.0), decay_fraction=st.floats(0.0, 1.0))
def test_every_schedule_is_finite_and_in_range(total, warmup_fraction, decay_fraction):
    for step in range(total):
        c = cosine_with_warmup(step, total, warmup_fraction)
        assert math.isfinite(c) and 0.01 - 1e-12 <= c <= 1.0 + 1e-12, (step, c)
        if warmup_fraction + decay_fraction <= 1.0:
            w = warmup_stable_decay(step, total, warmup_fraction, decay_fraction)
            assert math.isfinite(w) and 0.0 <= w <= 1.0 + 1e-12, (step, w)


@settings(max_examples=60, deadline=None)
@given(total=st.integers(2, 300), warmup_fraction=st.floats(0.0, 1.0))
def test_cosine_matches_one_cycle_wherever_that_is_defined(total, warmup_fraction):
    peak = warmup_fraction * total - 1
    # OneCycleLR divides by zero for a zero-length phase: a warm-up ending at step 0, or a decay of none.
    if abs(peak) < 1e-9 or abs(total - 1 - peak) < 1e-9 or peak > total - 1:
        return
    ours = [cosine_with_warmup(s, total, warmup_fraction) for s in range(total)]
    for step, (a, b) in enumerate(zip(ours, _one_cycle(total, warmup_fraction))):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (step, a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup_fraction=1.5), r"scheduler.warmup_fraction=1.5 is not allowed; use a number in \[0, 1\]"),
        (dict(initial_div=0.0), r"scheduler.initial_div=0.0 is not allowed; use a number > 0"),
        (dict(name="wsd", warmup_fraction=0.6, decay_fraction=0.6), r"warmup_fraction \+ decay_fraction = 1.2 must be <= 1"),
    ],
)
def test_schedule_arguments_are_checked(kwargs, message):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    with pytest.raises(ValueError, match=message):
        lr_scheduler(opt, 10, **kwargs)
