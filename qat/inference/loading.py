"""One way for the scripts to get a model: a training checkpoint (fake quantization, as
trained) or a packed export directory (integer codes, the integer forward)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn


class Model(NamedTuple):
    net: nn.Module
    tokenizer: Any
    config: dict  # the run config it was trained with
    step: int
    source: str  # what it was loaded from, for reports


def load_model(
    ckpt: str | Path | None = None, model_dir: str | Path | None = None, device: str | torch.device = "cpu", backend: str = "auto"
) -> Model:
    """Exactly one of `ckpt` (a train.py checkpoint) or `model_dir` (scripts/export.py output).
    backend ("auto" | "torch" | "triton") picks a packed model's kernels (qat.packed.linear)."""
    if (ckpt is None) == (model_dir is None):
        raise ValueError("give exactly one of --ckpt (a train.py checkpoint) or --model (an exported directory)")
    if ckpt is not None and backend != "auto":
        raise ValueError(f"backend={backend!r} applies to packed models (--model); a checkpoint runs its quantizers' own backend")
    if ckpt is not None:
        from qat.train.checkpoint import load_trained

        net, tokenizer, config, step = load_trained(ckpt, device)
        return Model(net, tokenizer, config, step, f"checkpoint {ckpt}")
    from qat.packed.load import load_packed

    net, tokenizer, config, step = load_packed(model_dir, device, backend)
    return Model(net, tokenizer, config, step, f"packed model {model_dir}")


def load_reference(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """A model to compare against (evaluate.py --reference): a train.py checkpoint (a file), a
    Hugging Face save_pretrained directory (config.json with a model_type: the 16-bit model,
    unquantized), or a packed export directory. Returns (the model in eval mode, what it is)."""
    from qat.hf.load import CONFIG_FILE, read_json

    path = Path(path)
    if path.is_file():
        return load_model(ckpt=path, device=device).net, f"checkpoint {path}"
    if not path.is_dir():
        raise ValueError(f"--reference={str(path)!r} does not exist (expected a save_pretrained directory, a train.py checkpoint or a packed export)")
    if "model_type" in read_json(path / CONFIG_FILE, "a reference model's config"):
        from qat.hf.load import load_hf_llama

        return load_hf_llama(path).to(device).eval(), f"Hugging Face model {path}"
    return load_model(model_dir=path, device=device).net, f"packed model {path}"
