"""AdamW parameter groups: decay only the matmul weights of the transformer blocks.

QuEST (and most LLM recipes) exempt norms, biases, embeddings and the output head. The
learnable quantizer scales (LSQ/PACT's scalar, a learned per-group weight scale) are exempt
too: decaying a step size biases it to zero, which is a different method, not a regulariser.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qat.quant.quantizer import Quantizer

NO_DECAY_MODULES = (nn.Embedding, Quantizer)
NO_DECAY_NAMES = ("lm_head",)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params: decayed, weight_decay}, {params: the rest, weight_decay: 0}]."""
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            exempt = (
                isinstance(module, NO_DECAY_MODULES)
                or module_name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
                or param.ndim < 2
            )
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """optimizer: a partial (e.g. AdamW with lr, betas and weight_decay) taking parameter
    groups. Its `weight_decay` is the one value: it goes to the decayed group, 0 to the rest."""
    keywords = getattr(optimizer, "keywords", {})
    weight_decay = keywords.get("weight_decay", 0.0)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay={weight_decay!r} must be a number >= 0")
    return optimizer(decay_groups(model, float(weight_decay)))

