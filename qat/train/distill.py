"""Distillation from the 16-bit model (`distill=kd`): the quantized student learns the teacher's
next-token distribution instead of the corpus alone (Gemma 3's QAT, NVIDIA ModelOpt's QAD).

The loss is T^2 * KL(softmax(teacher / T) || softmax(student / T)), the mean over tokens of the
full-vocabulary KL, optionally mixed with next-token cross-entropy:

    loss = (1 - ce_weight) * kd + ce_weight * ce

The T^2 factor keeps the gradient's size independent of T (Hinton et al.); at T = 1 it is 1.

The teacher is, by default, the model as loaded from `model.path` before quantization (the
student's own starting point); `distill.teacher=DIR` names another save_pretrained directory with
the same vocabulary and tokenizer. It is frozen, in eval mode, without gradients, in
`distill.teacher_dtype`. It is never a submodule of the trained module: it is not in the
optimizer, the state dict or a checkpoint, and FSDP does not shard it (every rank holds the whole
teacher, as DDP does). A LoRA run whose base is the teacher (the default: both are
`model.path`) holds no second copy: the teacher runs on the student's frozen base tensors (except
under FSDP, which shards them, and with another `teacher_dtype`). A checkpoint records the teacher's identity (its path and a SHA-256 of its
config and weight files, qat/train/identity.py); resuming against another teacher is refused,
naming both.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.inference.agreement import kl_from_log_probs
from qat.train.identity import check_same_model
from qat.train.lifecycle import pretrained_path

METHODS = ("none", "kd")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class DistillConfig:
    """The `distill` config group (configs/distill/*.yaml), validated once."""

    name: str = "none"  # "none" (next-token cross-entropy) | "kd" (distillation from a teacher)
    teacher: str | None = None  # a save_pretrained directory; null: model.path (the 16-bit start)
    temperature: float = 1.0
    ce_weight: float = 0.0  # the share of next-token cross-entropy in the loss, in [0, 1)
    teacher_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"distill.name={self.name!r} is not allowed; choose one of {', '.join(map(repr, METHODS))}")
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher):
            raise ValueError(f"distill.teacher={self.teacher!r} must be a directory path or null")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature!r} must be a number > 0")
        if not number(self.ce_weight) or not 0 <= self.ce_weight < 1:
            raise ValueError(f"distill.ce_weight={self.ce_weight!r} must be in [0, 1) (1 is plain cross-entropy: distill=none)")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"distill.teacher_dtype={self.teacher_dtype!r} is not allowed; choose one of {', '.join(map(repr, TEACHER_DTYPES))}")
        if self.name == "none" and (self.teacher is not None or self.temperature != 1.0 or self.ce_weight != 0.0):
            raise ValueError("distill.teacher / temperature / ce_weight are ignored with distill=none; add distill=kd")

    @property
    def enabled(self) -> bool:
        return self.name == "kd"

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> DistillConfig:
        """From the composed config (a config from before distillation has no `distill`: none)."""
        raw = cfg.get("distill")
        values = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else dict(raw or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"distill.{unknown[0]} is not a key; allowed: {', '.join(f'distill.{k}' for k in sorted(allowed))}")
        return cls(**values)


# Positions per chunk of the loss: bounds its temporaries to a few [chunk, V] tensors (at a
# 49k vocabulary, 1,024 positions are 200 MB each in fp32) instead of [B * T, V] ones.
KD_CHUNK = 1024


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    log_q = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    return kl_from_log_probs(log_p, log_q)


class _TokenKL(torch.autograd.Function):
    """KL(softmax(t / T) || softmax(s / T)) per position, for logits [N, V], with the closed-form
    backward d/ds = (softmax(s / T) - softmax(t / T)) / T. Autograd's own backward keeps five
    [N, V] tensors alive from the forward to the backward (log q, p, log p - log q, the mask,
    the product); this keeps none beyond the two logit tensors the caller holds anyway, and
    computes chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.dtype = temperature, dtype
        return torch.cat([_kl_rows(s, t, temperature, dtype) for s, t in zip(student.split(KD_CHUNK), teacher.split(KD_CHUNK))])

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        student, teacher = ctx.saved_tensors
        t, dtype = ctx.temperature, ctx.dtype
        grad = torch.empty_like(student)
        for start in range(0, len(student), KD_CHUNK):
            rows = slice(start, start + KD_CHUNK)
            q_minus_p = torch.softmax(student[rows].to(dtype) / t, dim=-1) - torch.softmax(teacher[rows].to(dtype) / t, dim=-1)
            grad[rows] = q_minus_p * (grad_kl[rows].to(dtype) / t).unsqueeze(-1)
        return grad, None, None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of KL(softmax(teacher / T) || softmax(student / T)) over the
    last dim, in float32 at least (float64 stays float64); exactly 0 when the logits are equal."""
    vocab = student.shape[-1]
    per_position = _TokenKL.apply(student.reshape(-1, vocab), teacher.detach().reshape(-1, vocab), float(temperature))
    return per_position.mean() * temperature**2


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce): student / teacher logits [B, T, V], targets [B, T]."""
    kd = kd_loss(student, teacher, cfg.temperature)
    # Without a cross-entropy share, cross-entropy is only logged: outside the graph, so that its
    # log-softmax over [B, T, V] is not kept for a backward that multiplies it by 0.
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.ce_weight > 0):
        ce = F.cross_entropy(student.to(torch.promote_types(student.dtype, torch.float32)).flatten(0, 1), targets.flatten())
    return ((1 - cfg.ce_weight) * kd + cfg.ce_weight * ce if cfg.ce_weight > 0 else kd), kd, ce


# ----------------------------------------------------------------- the teacher


def teacher_directory(distill: DistillConfig, model: Any) -> str:
    """The teacher's directory: distill.teacher, else model=hf's model.path; one line if neither."""
    if distill.teacher is not None:
        return distill.teacher
    return pretrained_path(model, "distill=kd needs a teacher", "name one with distill.teacher=DIR")


def _vocabulary(directory: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    from qat.hf.tokenizer import TOKENIZER_FILE

    file = directory / TOKENIZER_FILE
    if not file.is_file():
        raise ValueError(f"distill.teacher={str(directory)!r} has no {TOKENIZER_FILE}; a teacher needs the student's tokenizer")
    return Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)


def check_teacher(distill: DistillConfig, model: Any, tokenizer_path: str | None, vocab_size: int) -> Path:
    """Everything about the teacher that reads no weights: a save_pretrained Llama directory
    (config and tensor headers), the student's vocabulary size, and the same tokenizer
    vocabulary as the student's. Returns the resolved directory."""
    from qat.hf.load import check_checkpoint, checkpoint_dir, read_config

    path = teacher_directory(distill, model)
    directory = checkpoint_dir(path, key="distill.teacher" if distill.teacher is not None else "model.path")
    try:
        check_checkpoint(directory)
    except ValueError as err:
        raise ValueError(f"distill.teacher={path!r}: {err}") from None
    teacher_vocab = read_config(directory)[1].vocab_size
    student_vocab = read_config(model["path"])[1].vocab_size if model.get("size") == "hf" else vocab_size
    if teacher_vocab != student_vocab:
        raise ValueError(f"distill.teacher={path!r} has vocab_size={teacher_vocab}, the student {student_vocab}; a teacher needs the same vocabulary")
    if distill.teacher is not None and tokenizer_path is not None:
        student_dir = Path(tokenizer_path)
        if _vocabulary(directory) != _vocabulary(student_dir if student_dir.is_dir() else student_dir.parent):
            raise ValueError(f"distill.teacher={path!r} has another tokenizer than the student's ({tokenizer_path}); a teacher needs the same tokens")
    return directory


def check_same_teacher(saved: dict[str, str] | None, now: dict[str, str], checkpoint: Path) -> None:
    """A resumed run distils from the teacher it started with."""
    check_same_model(
        saved, now,
        absent=f"{checkpoint} was trained without distillation; resume=false (or another run_name=) starts a distilled run",
        recorded=f"{checkpoint} was distilled from",
        remedy="resume=false (or another run_name=) starts a new run",
    )  # fmt: skip


def load_teacher(directory: Path, vocab_size: int, dtype: str) -> nn.Module:
    """The frozen teacher: our plain Llama with the directory's weights, eval mode, no gradients."""
    from qat.hf.load import load_hf_llama

    teacher = load_hf_llama(directory, vocab_size=vocab_size).to(TEACHER_DTYPES[dtype]).eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_skeleton(directory: Path, vocab_size: int) -> nn.Module:
    """The teacher's structure on the meta device, no weights: for a teacher that computes with
    the student's own frozen tensors (`Teacher(..., student=...)`)."""
    from qat.hf.load import check_checkpoint
    from qat.models.llama import Llama

    with torch.device("meta"):
        skeleton = Llama(check_checkpoint(str(directory), vocab_size=vocab_size)[0])
    return skeleton.eval().requires_grad_(False)


def student_weights(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's parameters and buffers by plain-model name (wrappers' prefixes removed)."""
    from qat.train.lifecycle import plain_name

    named = itertools.chain(student.named_parameters(remove_duplicate=False), student.named_buffers())
    return {plain_name(n): t for n, t in named}


def shares_weights(skeleton: nn.Module, student: nn.Module) -> bool:
    """Whether every teacher parameter is a frozen student tensor of the same name, shape and
    dtype: what a LoRA student of the teacher's own weights holds (its base is frozen as loaded)."""
    own = student_weights(student)
    return all(
        n in own and own[n].shape == p.shape and own[n].dtype == p.dtype and not own[n].requires_grad
        for n, p in skeleton.named_parameters(remove_duplicate=False)
    )


class Teacher:
    """The teacher beside the trained module: a plain object, so that Lightning, the optimizer,
    FSDP and the checkpoint never see it as a submodule. `logits` moves it to the batch's device
    on first use.

    With `student`, the teacher holds no weights: `net` is a meta-device skeleton, run on the
    student's frozen tensors of the same names (torch.func.functional_call), wherever they
    live now. That is a LoRA run whose base is the teacher: the base is the teacher's weights,
    frozen, so a second copy would only cost memory (a whole model: 27 GB for a 7B in fp32)."""

    def __init__(self, net: nn.Module, cfg: DistillConfig, identity: dict[str, str], student: nn.Module | None = None) -> None:
        self.net, self.cfg, self.identity, self.student = net, cfg, identity, student
        if student is not None and not shares_weights(net, student):
            raise ValueError("the teacher cannot share the student's weights: a teacher tensor is missing, trained or of another shape or dtype")
        # Looked up once: moving the student (.to) keeps its Parameter objects and swaps their data.
        own = student_weights(student) if student is not None else {}
        self._shared = {n: own[n] for n, _ in net.named_parameters()} if student is not None else None

    @torch.no_grad()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        if self._shared is not None:
            return torch.func.functional_call(self.net, self._shared, (idx,))
        if next(self.net.parameters()).device != idx.device:
            self.net.to(idx.device)
        return self.net(idx)
