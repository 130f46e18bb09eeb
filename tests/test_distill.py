"""Distillation's loss and config (qat/train/distill.py), on tiny models in float64.

The loss against closed forms: exactly 0 when the student computes the teacher (16 bits, no
rotation; within 1e-12 through an exact 16-bit Hadamard rotation), and its gradient equal to
the hand-computed KL gradient T * (softmax(s / T) - softmax(t / T)) / N pushed back through the
student by autograd. End-to-end runs (resume, another teacher, DDP, FSDP) are in
tests/test_distill_runs.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat.quant.config import QuantizerConfig
from qat.quant.convert import quantize_model
from qat.train.distill import DistillConfig, distill_loss, kd_loss, teacher_directory


def tiny_pair(weight: QuantizerConfig, activation: QuantizerConfig) -> tuple[Llama, Llama]:
    torch.manual_seed(0)
    teacher = Llama(llama_config("debug-xs", vocab_size=64, max_seq_len=16)).double().eval()
    student = copy.deepcopy(teacher)
    quantize_model(student, weight, activation)
    return teacher, student


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def test_kd_is_exactly_zero_when_the_student_computes_the_teacher():
    plain = QuantizerConfig(bits=16, rotation="none")
    teacher, student = tiny_pair(plain, plain)
    x = tokens()
    with torch.no_grad():
        assert kd_loss(student(x), teacher(x)).item() == 0.0
    rotated = QuantizerConfig(bits=16, rotation="hadamard", hadamard_block=16)
    teacher, student = tiny_pair(rotated, rotated)
    with torch.no_grad():
        assert abs(kd_loss(student(x), teacher(x)).item()) < 1e-12  # float64 rounding of the rotation


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_gradient_equals_the_hand_computed_kl_gradient(temperature):
    four = QuantizerConfig(bits=4, rotation="hadamard", hadamard_block=16)
    teacher, student = tiny_pair(four, four)
    x = tokens()
    with torch.no_grad():
        t = teacher(x)
    weights = [p for p in student.parameters() if p.requires_grad]
    s = student(x)
    auto = torch.autograd.grad(kd_loss(s, t, temperature), weights)
    # d/ds [T^2 * mean_n KL(p_T || q_T)] = T * (q_T - p_T) / N, with N the positions.
    positions = s.shape[0] * s.shape[1]
    hand_logit_grad = temperature * (torch.softmax(s.detach() / temperature, -1) - torch.softmax(t / temperature, -1)) / positions
    hand = torch.autograd.grad(student(x), weights, hand_logit_grad)
    for a, h in zip(auto, hand):
        assert torch.allclose(a, h, rtol=1e-10, atol=1e-14)
    assert any(a.abs().max() > 0 for a in auto)  # a gradient that exists, not a vacuous equality


def test_loss_mixes_cross_entropy_by_ce_weight():
    torch.manual_seed(0)
    s, t, y = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64), torch.randint(0, 7, (2, 3))
    loss, kd, ce = distill_loss(s, t, y, DistillConfig(name="kd", ce_weight=0.25, temperature=2.0))
    assert kd.item() == pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-15)
    assert ce.item() == pytest.approx(F.cross_entropy(s.flatten(0, 1), y.flatten()).item(), rel=1e-15)
    assert loss.item() == pytest.approx(0.75 * kd.item() + 0.25 * ce.item(), rel=1e-15)


@pytest.mark.parametrize(
    "values, named",
    [
        ({"name": "ce"}, "distill.name='ce'"),
        ({"name": "kd", "temperature": 0}, "distill.temperature=0"),
        ({"name": "kd", "ce_weight": 1.0}, "distill.ce_weight=1.0"),
        ({"name": "kd", "teacher_dtype": "int8"}, "distill.teacher_dtype='int8'"),
        ({"name": "none", "ce_weight": 0.5}, "ignored with distill=none"),
        ({"name": "kd", "teacher": ""}, "distill.teacher=''"),
    ],
)
def test_bad_distill_values_are_refused_in_one_line(values, named):
    with pytest.raises(ValueError) as err:
        DistillConfig(**values)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_from_scratch_run_has_no_default_teacher():
    with pytest.raises(ValueError, match="trained from scratch"):
        teacher_directory(DistillConfig(name="kd"), {"size": "debug"})
    assert teacher_directory(DistillConfig(name="kd"), {"size": "hf", "path": "m"}) == "m"
    assert teacher_directory(DistillConfig(name="kd", teacher="t"), {"size": "debug"}) == "t"


def test_unknown_distill_key_is_refused():
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="distill.temp is not a key"):
        DistillConfig.from_cfg(OmegaConf.create({"distill": {"name": "kd", "temp": 2}}))
    assert DistillConfig.from_cfg(OmegaConf.create({})) == DistillConfig()  # a config from before distillation


def test_the_comparison_loop_distils_from_its_teacher():
    """compare_torchao's kd arms: train_arm with a teacher trains on the KL to it (loss exactly 0
    at the first step for a student that computes the teacher), not on the corpus."""
    from qat.inference.compare import train_arm

    plain = QuantizerConfig(bits=16, rotation="none")
    teacher, student = tiny_pair(plain, plain)
    batches = [(tokens(), tokens()) for _ in range(2)]
    assert train_arm(student.float(), batches, lr=1e-3, warmup=1, teacher=teacher.float()).losses[0] == 0.0


def test_the_loss_in_chunks_equals_autograds_and_keeps_no_vocabulary_sized_temporaries(monkeypatch):
    """kd_loss's hand-written backward, chunk by chunk, against autograd through the formula
    (float64, teacher zeros included); and between forward and backward it holds no [N, V]
    tensor beyond the logits: autograd's version held five."""
    import qat.train.distill as distill
    from qat.inference.agreement import kl_from_log_probs
    from qat.inference.compare import memory_profile, profiled_peak_bytes

    monkeypatch.setattr(distill, "KD_CHUNK", 5)  # 2 x 9 positions: chunks of 5, 5, 5, 3
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 9, 31, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(2, 9, 31, dtype=torch.float64, generator=g)
    t[0, 0, :4] = -torch.inf  # tokens the teacher rules out: p = 0 terms are 0
    for temperature in (1.0, 2.5):
        fused = kd_loss(s, t, temperature)
        (grad,) = torch.autograd.grad(fused, s)
        log_q, log_p = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
        reference = kl_from_log_probs(log_p, log_q).mean() * temperature**2
        (expected,) = torch.autograd.grad(reference, s)
        assert fused.item() == pytest.approx(reference.item(), rel=1e-14)
        assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-16)

    monkeypatch.setattr(distill, "KD_CHUNK", 16)
    s = torch.randn(256, 4096, requires_grad=True)  # 4 MiB of logits, 16 chunks
    t = torch.randn(256, 4096)
    logits = s.numel() * s.element_size()
    with memory_profile() as forward:
        loss = kd_loss(s, t)
    events = [e.nbytes() for e in forward.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert sum(events) < 0.1 * logits  # kept for the backward: nothing of size [N, V] (autograd's formula: ~5x the logits)
    assert profiled_peak_bytes(forward) < 0.5 * logits  # one chunk's temporaries at a time
    with memory_profile() as backward:
        loss.backward()
    assert profiled_peak_bytes(backward) < 1.5 * logits  # the gradient plus one chunk's temporaries
