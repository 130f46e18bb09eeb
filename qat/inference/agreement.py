"""How close a model stays to a reference model, as llama.cpp's `llama-perplexity --kl-divergence`
reports it: on the same tokens, both models' perplexity, the mean per-token KL(reference || model),
its 99th percentile, the RMS of Δp (the change in the probability of the true next token) and
"same top p" (the share of positions where both models' most likely token is the same).

`AgreementMeter` accumulates these over batches of logits; nothing here knows where the logits
came from (our fake-quant model, a packed export, llama.cpp through llama-cpp-python, torchao).
KL is computed in float64 from log-softmax, so a model equal to its reference scores exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# The percentile llama.cpp prints next to the mean KL (it also prints 90/95/99.9; 99 is the one its users quote).
KL_PERCENTILE = 99.0


def token_kl(logits: torch.Tensor, reference: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(reference / T) || softmax(logits / T)) per position, over the last (vocabulary)
    dim, in float64: [..., V] -> [...]. Exactly 0 where the two rows are equal."""
    log_p = torch.log_softmax(reference.double() / temperature, dim=-1)
    log_q = torch.log_softmax(logits.double() / temperature, dim=-1)
    return kl_from_log_probs(log_p, log_q)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v) over the last dim; p_v = 0 terms are 0 (never 0 * inf)."""
    return torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_q)).sum(dim=-1)


@dataclass
class AgreementMeter:
    """Running sums over every scored position (logits [B, T, V], targets [B, T])."""

    nll: float = 0.0
    reference_nll: float = 0.0
    kl_sum: float = 0.0
    dp_square_sum: float = 0.0
    same_top1: int = 0
    count: int = 0
    kls: list[torch.Tensor] = field(default_factory=list)  # per-token KL, for the percentile

    @torch.no_grad()
    def update(self, logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.shape != reference.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and reference logits {tuple(reference.shape)} differ in shape (same vocabulary and tokens needed)")
        logits, reference, targets = logits.flatten(0, -2), reference.flatten(0, -2), targets.flatten()
        log_q = torch.log_softmax(logits.double(), dim=-1)
        log_p = torch.log_softmax(reference.double(), dim=-1)
        kl = kl_from_log_probs(log_p, log_q)
        true_q = log_q.gather(-1, targets[:, None]).squeeze(-1)
        true_p = log_p.gather(-1, targets[:, None]).squeeze(-1)
        self.nll -= float(true_q.sum())
        self.reference_nll -= float(true_p.sum())
        self.kl_sum += float(kl.sum())
        self.dp_square_sum += float((true_q.exp() - true_p.exp()).square().sum())
        self.same_top1 += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        self.count += targets.numel()
        self.kls.append(kl.float().cpu())

    def result(self) -> dict[str, float]:
        """ppl, reference_ppl, kl_mean, kl_p99, rms_dp (in %, as llama.cpp), same_top1 (in %), tokens."""
        if self.count == 0:
            raise ValueError("no tokens were scored against the reference")
        kls = torch.cat(self.kls).double()
        return {
            "ppl": math.exp(min(self.nll / self.count, 50.0)),
            "reference_ppl": math.exp(min(self.reference_nll / self.count, 50.0)),
            "kl_mean": self.kl_sum / self.count,
            "kl_p99": float(np.percentile(kls.numpy(), KL_PERCENTILE)),  # linear interpolation, as numpy's default
            "rms_dp": 100.0 * math.sqrt(self.dp_square_sum / self.count),
            "same_top1": 100.0 * self.same_top1 / self.count,
            "tokens": self.count,
        }
