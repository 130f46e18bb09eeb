"""Scales and estimators for pretrained weights: a tiny model with planted outlier weights stands in
for a pretrained one (its largest weights many times its RMS, as real Llamas' are).

- The trust radius follows the scale in use: under absmax no weight is masked (every element is
  within half a step of a level, and none is clipped), while at the rms_mse scale the radius is
  QuEST's, in RMS units, bit for bit as before.
- The presets that fine-tune pretrained models clip no weight at step 0 worse than absmax does
  (weight MSE, on the planted outliers).
- No preset x scale x estimator combination the configs allow diverges in a few steps at a
  normal learning rate.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat.quant.config import QuantizerConfig
from qat.quant.convert import quantize_model
from qat.quant.grids import make_grid
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize, rotate

PRETRAINED_PRESETS = ("gguf_q4_0", "gguf_q4_1", "gguf_q8_0", "ct_w4a16_g128", "ct_w8a16", "quest", "weight_only")


def planted_weights(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with one outlier column and a few outlier entries (20x the RMS)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.02
    w[:, 7] *= 8.0
    w[torch.randint(0, rows, (6,), generator=g), torch.randint(0, cols, (6,), generator=g)] = 0.4
    return w


def preset_configs(preset: str, **weight_overrides) -> tuple[QuantizerConfig, QuantizerConfig]:
    """(weight, activation) configs of a preset as a model=hf run resolves them (full Hadamard),
    with `weight_overrides` on the weight side."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model=hf", "model.path=m", f"quant={preset}"])
    weight, activation = (OmegaConf.to_container(cfg.quant[side], resolve=True) for side in ("weight", "activation"))
    return QuantizerConfig.from_mapping({**weight, **weight_overrides}), QuantizerConfig.from_mapping(activation)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_trust_masks_nothing_under_absmax(rotation, asymmetric):
    cfg = QuantizerConfig(bits=4, rotation=rotation, granularity=32, scale="absmax", grid="int" if asymmetric else "int_zero", asymmetric=asymmetric)
    q = fake_quantize(planted_weights(), cfg)
    assert bool(q.grad_mask.all())


def test_trust_at_the_rms_mse_scale_is_quests_radius_in_rms_units():
    w = planted_weights()
    for trust in (None, 0.05):
        cfg = QuantizerConfig(bits=4, rotation="none", trust=trust)
        q = fake_quantize(w, cfg)
        rms = w.square().mean(-1, keepdim=True).sqrt()
        radius = (trust if trust is not None else make_grid(4).default_trust) * rms
        assert torch.equal(q.grad_mask, (q.value - w).abs() <= radius)
        assert not bool(q.grad_mask.all())  # the clipped outliers are masked: QuEST's estimator
    # An explicit trust stays in RMS units under absmax too (and then masks ordinary elements).
    explicit = fake_quantize(w, QuantizerConfig(bits=4, rotation="none", scale="absmax", trust=0.05))
    assert not bool(explicit.grad_mask.all())


@pytest.mark.parametrize("preset", PRETRAINED_PRESETS)
def test_pretrained_presets_clip_no_worse_than_absmax_at_step_0(preset):
    """Without a rotation the presets fit absmax (equal). With model=hf's full rotation the scale
    is c(bits) * RMS, the Gaussian optimum of the rotated rows: at a real width (SmolLM2 FFN 1536) the
    rotation spreads the planted outliers and it beats absmax. (On SmolLM2 itself: 32% lower
    weight error than absmax, worse in 50 of 155,520 rows; docs/results.md.)"""
    cfg, _ = preset_configs(preset)
    w = planted_weights(cols=1536)
    absmax = QuantizerConfig.from_mapping({**cfg.to_dict(), "scale": "absmax", "trust": None})
    target = rotate(w, cfg)
    err = (fake_quantize(w, cfg).value - target).square().sum()
    err_absmax = (fake_quantize(w, absmax).value - target).square().sum()
    assert err <= err_absmax * (1 + 1e-12), (preset, float(err), float(err_absmax))


def _tiny_with_outliers() -> Llama:
    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=64, max_seq_len=32))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Linear) and m is not net.lm_head:
                m.weight[:, 3] *= 10.0  # an outlier input channel, as pretrained Llamas have
                m.weight.view(-1)[::97] = 20 * m.weight.std()
    return net


COMBINATIONS = [
    (preset, scale, estimator)
    for preset in PRETRAINED_PRESETS
    for scale in ("absmax", "rms_mse", "mse_search")
    for estimator in ("trust", "ste", "clip")
]


@pytest.mark.slow  # 63 short trainings, about 75 s: a sweep for the full suite, not the inner loop
@pytest.mark.parametrize("preset, scale, estimator", COMBINATIONS)
def test_no_allowed_combination_diverges_in_a_few_steps(preset, scale, estimator, one_thread):
    if preset == "gguf_q4_1" and scale == "mse_search":
        pytest.skip("asymmetric=true allows the rms_mse and absmax fits only")
    weight, activation = preset_configs(preset, scale=scale, estimator=estimator)
    net = _tiny_with_outliers()
    quantize_model(net, weight, activation)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 32), generator=g)
    y = torch.randint(0, 64, (4, 32), generator=g)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (preset, scale, estimator, losses)
    assert any(isinstance(m, QuantLinear) for m in net.modules())

