"""The llama.cpp-style agreement metrics (qat/inference/agreement.py) against closed forms on
hand-made logits, computed here with the math module."""

import math

import numpy as np
import pytest
import torch

from qat.inference.agreement import AgreementMeter, token_kl


def _softmax(row):
    z = [math.exp(v - max(row)) for v in row]
    return [v / sum(z) for v in z]


# Three positions over a vocabulary of 3: (model logits, reference logits, true next token).
CASES = [
    ([math.log(3.0), 0.0, 0.0], [1.0, 0.0, 0.0], 0),
    ([0.0, 2.0, 0.0], [0.0, 0.0, 1.0], 2),
    ([0.5, -1.0, 0.25], [0.5, -1.0, 0.25], 1),  # equal rows: KL exactly 0, same top-1
]


def test_metrics_equal_closed_forms_on_hand_made_logits():
    logits = torch.tensor([[c[0] for c in CASES]], dtype=torch.float64)
    reference = torch.tensor([[c[1] for c in CASES]], dtype=torch.float64)
    targets = torch.tensor([[c[2] for c in CASES]])
    meter = AgreementMeter()
    meter.update(logits, reference, targets)
    r = meter.result()

    q = [_softmax(c[0]) for c in CASES]
    p = [_softmax(c[1]) for c in CASES]
    kl = [sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)]
    nll = [-math.log(qr[c[2]]) for qr, c in zip(q, CASES)]
    ref_nll = [-math.log(pr[c[2]]) for pr, c in zip(p, CASES)]
    dp = [qr[c[2]] - pr[c[2]] for qr, pr, c in zip(q, p, CASES)]

    assert r["tokens"] == 3
    assert r["kl_mean"] == pytest.approx(sum(kl) / 3, rel=1e-12)
    assert r["kl_p99"] == pytest.approx(float(np.percentile(kl, 99)), rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(sum(nll) / 3), rel=1e-12)
    assert r["reference_ppl"] == pytest.approx(math.exp(sum(ref_nll) / 3), rel=1e-12)
    assert r["rms_dp"] == pytest.approx(100 * math.sqrt(sum(d * d for d in dp) / 3), rel=1e-12)
    # top-1: position 0 both pick 0; position 1 picks 1 vs 2; position 2 equal rows
    assert r["same_top1"] == pytest.approx(100 * 2 / 3)


def test_equal_models_score_zero_kl_and_full_agreement_over_batches():
    torch.manual_seed(0)
    meter = AgreementMeter()
    for _ in range(3):
        logits = torch.randn(2, 5, 11)
        meter.update(logits, logits.clone(), torch.randint(0, 11, (2, 5)))
    r = meter.result()
    assert r["kl_mean"] == 0.0 and r["kl_p99"] == 0.0 and r["rms_dp"] == 0.0
    assert r["same_top1"] == 100.0 and r["ppl"] == r["reference_ppl"] and r["tokens"] == 30


def test_token_kl_at_a_temperature_and_bad_shapes():
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p, q = _softmax([0.0, 0.0]), _softmax([1.0, 0.0])  # T = 2 halves the logits
    assert token_kl(a, b, temperature=2.0).item() == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), rel=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        AgreementMeter().update(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        AgreementMeter().result()
