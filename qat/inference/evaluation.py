"""Evaluation: language-model loss over a loader, and multiple-choice accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def loss_over(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str = "cpu") -> dict[str, float]:
    """Token-weighted mean cross-entropy and perplexity over (x, y) batches."""
    total, count = 0.0, 0
    for x, y in batches:
        logits = net(x.to(device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    if count == 0:
        raise ValueError("no validation batches to evaluate")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def continuation_logprob(net: nn.Module, context: Sequence[int], continuation: Sequence[int]) -> float:
    """Sum of log p(continuation tokens | context and earlier continuation tokens)."""
    device = next(net.parameters()).device
    ids = torch.tensor([list(context) + list(continuation)], device=device)
    logprobs = torch.log_softmax(net(ids[:, :-1]).float(), dim=-1)[0]
    targets = ids[0, len(context) :]
    positions = torch.arange(len(context) - 1, ids.shape[1] - 1, device=device)
    return float(logprobs[positions, targets].sum())


def multiple_choice_accuracy(net: nn.Module, tokenizer: Any, examples: Iterable[dict]) -> dict[str, float]:
    """HellaSwag-style scoring: each example {"ctx", "endings", "label"}; the ending with the
    highest total log-probability (acc) or per-byte log-probability (acc_norm, as lm-eval)."""
    correct = correct_norm = n = 0
    for i, ex in enumerate(examples):
        try:
            ctx, endings, label = ex["ctx"], list(ex["endings"]), int(ex["label"])
            if not isinstance(ctx, str) or not all(isinstance(e, str) for e in endings):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"example {i} needs keys ctx (str), endings (list of str) and label (int)") from None
        if not 0 <= label < len(endings):
            raise ValueError(f"example {i}: label={label} is outside 0..{len(endings) - 1}")
        context = tokenizer.encode(ctx)
        scores = [continuation_logprob(net, context, tokenizer.encode(" " + e.strip())) for e in endings]
        norm = [s / max(1, len((" " + e.strip()).encode())) for s, e in zip(scores, endings)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == label)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == label)
        n += 1
    if n == 0:
        raise ValueError("no multiple-choice examples to score")
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
