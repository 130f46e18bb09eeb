"""Named model sizes: the one table of shapes and peak learning rates.

The QuEST rows reproduce the published training scripts (30M ... 1.6B). The CPU rows
are for tests and smoke runs: every linear's input dim (d_model and the SwiGLU hidden
size) is a multiple of 128, so a 128-block Hadamard rotation divides it.
"""

import dataclasses
from dataclasses import dataclass

import torch

from qat.models.llama import Llama, LlamaConfig


@dataclass(frozen=True)
class ModelSize:
    name: str
    n_layer: int
    d_model: int
    n_head: int
    peak_lr: float
    multiple_of: int = 256
    n_kv_head: int | None = None

    def __post_init__(self) -> None:
        if not self.peak_lr > 0:
            raise ValueError(f"peak_lr={self.peak_lr!r} for size {self.name!r}: must be positive")


MODEL_SIZES: dict[str, ModelSize] = {
    s.name: s
    for s in [
        # CPU sizes (head_dim 64); multiple_of 128 keeps the hidden size a multiple of 128.
        ModelSize("debug-xs", n_layer=1, d_model=128, n_head=2, peak_lr=3e-3, multiple_of=128),
        ModelSize("debug", n_layer=2, d_model=128, n_head=2, peak_lr=3e-3, multiple_of=128),
        ModelSize("debug-l", n_layer=2, d_model=256, n_head=4, peak_lr=3e-3, multiple_of=128),
        # QuEST sizes (head_dim 128); the LR halves each time the size roughly doubles.
        ModelSize("30M", n_layer=6, d_model=640, n_head=5, peak_lr=1.2e-3),
        ModelSize("50M", n_layer=7, d_model=768, n_head=6, peak_lr=1.2e-3),
        ModelSize("100M", n_layer=8, d_model=1024, n_head=8, peak_lr=6e-4),
        ModelSize("200M", n_layer=10, d_model=1280, n_head=10, peak_lr=3e-4),
        ModelSize("430M", n_layer=13, d_model=1664, n_head=13, peak_lr=1.5e-4),
        ModelSize("800M", n_layer=16, d_model=2048, n_head=16, peak_lr=7.5e-5),
        ModelSize("1.6B", n_layer=20, d_model=2560, n_head=20, peak_lr=3.75e-5),
        # Our extrapolation, not a published run: shape from the reference scripts' unused
        # "3200M" block, LR continuing the halving rule.
        ModelSize("3.2B", n_layer=28, d_model=3072, n_head=24, peak_lr=1.875e-5),
    ]
}


def _size(name: str) -> ModelSize:
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}; allowed: {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[name]


def llama_config(size: str, vocab_size: int, max_seq_len: int = 2048, **overrides) -> LlamaConfig:
    """LlamaConfig for a named size; `overrides` replace any LlamaConfig field."""
    s = _size(size)
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LlamaConfig field(s) {unknown}; allowed: {', '.join(sorted(fields))}")
    kwargs = dict(
        vocab_size=vocab_size,
        n_layer=s.n_layer,
        d_model=s.d_model,
        n_head=s.n_head,
        n_kv_head=s.n_kv_head,
        multiple_of=s.multiple_of,
        max_seq_len=max_seq_len,
    )
    return LlamaConfig(**{**kwargs, **overrides})


def non_embedding_params(size: str) -> int:
    """N of a named size, counted on the model itself (built on the meta device: no memory).
    It does not depend on the vocabulary, so any vocab_size works."""
    with torch.device("meta"):
        return Llama(llama_config(size, vocab_size=1)).num_params(non_embedding=True)
