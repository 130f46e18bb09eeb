import math

import pytest
import torch
from torch import nn

from qat.inference.evaluation import continuation_logprob, loss_over, multiple_choice_accuracy
from qat.inference.generation import generate

V = 28  # ' ' = 0, 'a'..'z' = 1..26, eos = 27


class Chars:
    eos_id = 27

    def encode(self, text):
        return [0 if c == " " else ord(c) - 96 for c in text]


class NextLetter(nn.Module):
    """p(next = prev + 1) = e^5 / (e^5 + V - 1): a model whose log-probs we know exactly."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, V)
        return logits.scatter(-1, ((idx + 1) % V).unsqueeze(-1), 5.0) + self.dummy


LOGP_HIT = 5 - math.log(math.exp(5) + V - 1)
LOGP_MISS = -math.log(math.exp(5) + V - 1)


def test_continuation_logprob_matches_hand_computation():
    net = NextLetter()
    assert math.isclose(continuation_logprob(net, [1], [2, 3]), 2 * LOGP_HIT, rel_tol=1e-6)
    assert math.isclose(continuation_logprob(net, [1], [3, 4]), LOGP_MISS + LOGP_HIT, rel_tol=1e-6)


def test_multiple_choice_picks_the_likely_ending():
    # endings are scored with a leading space (token 0), so ' abc' continues the chain 0, 1, 2, 3
    examples = [{"ctx": "x", "endings": ["abc", "zzz", "q"], "label": 0}, {"ctx": "x", "endings": ["zz", "ab"], "label": 1}]
    out = multiple_choice_accuracy(NextLetter(), Chars(), examples)
    assert out == {"acc": 1.0, "acc_norm": 1.0, "n": 2}
    wrong = [{"ctx": "x", "endings": ["abc", "zzz"], "label": 1}]
    assert multiple_choice_accuracy(NextLetter(), Chars(), wrong)["acc"] == 0.0


def test_multiple_choice_bad_examples():
    with pytest.raises(ValueError, match="example 0 needs keys ctx"):
        multiple_choice_accuracy(NextLetter(), Chars(), [{"context": "a"}])
    with pytest.raises(ValueError, match="label=5 is outside 0..1"):
        multiple_choice_accuracy(NextLetter(), Chars(), [{"ctx": "a", "endings": ["b", "c"], "label": 5}])


def test_greedy_sampling_and_loss():
    net = NextLetter()
    assert generate(net, [1], 4, temperature=0, use_cache=False) == [2, 3, 4, 5]
    x = torch.tensor([[1, 2, 3]])
    out = loss_over(net, [(x, x + 1)])
    assert math.isclose(out["loss"], -LOGP_HIT, rel_tol=1e-6) and out["tokens"] == 3
