"""Export a train.py checkpoint as a Hugging Face Llama directory: plain transformers loads it
with `AutoModelForCausalLM.from_pretrained(DIR)` (no custom code) and `AutoTokenizer`.

weights="latent": the trained high-precision weights. weights="quantized": every quantized
linear's weight as the layer multiplies it, Q(W H) H^T. Our layer computes (x H) Q(W H)^T;
H (block Hadamard, or the identity without rotation) is orthonormal (and symmetric for
power-of-two blocks, not for every Paley block), so with 16-bit inputs that is
x (Q(W H) H^T)^T: plain transformers then computes our model with
quantized weights and unquantized activations. The activation quantizer cannot be expressed
in plain transformers; config.json records it, and every quantizer setting, under
`qat_quantization` (metadata only: transformers keeps the key and does nothing with it).

The directory is written beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qat.hf.config import hf_config
from qat.io import atomic_directory, check_output_dir
from qat.hf.convert import hf_state_dict
from qat.hf.tokenizer import GENERATION_CONFIG, write_tokenizer
from qat.quant.hadamard import hadamard_transform
from qat.quant.linear import QuantLinear
from qat.quant.quantizer import fake_quantize

WEIGHT_CHOICES = ("latent", "quantized")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METADATA_KEY = "qat_quantization"


@torch.no_grad()
def quantized_weight(name: str, layer: QuantLinear) -> torch.Tensor:
    """Q(W H) H^T: the weight a 16-bit input meets, in the unrotated basis (W's shape and dtype)."""
    q = layer.weight_quantizer
    value = fake_quantize(layer.weight.detach(), q.cfg, q.grid, q.scale_to_export(layer.weight.detach(), name)).value
    if q.cfg.rotation == "hadamard":
        # Back to the unrotated basis by H^T (= H^-1 for orthonormal H): a Paley block
        # (e.g. H_344 ⊗ H_32 for 11008) is not symmetric, so H itself would be wrong there.
        value = hadamard_transform(value, q.cfg.hadamard_block, inverse=True)
    return value


def plain_state(net: nn.Module, weights: str) -> dict[str, torch.Tensor]:
    """The net's state dict as a plain Llama's: quantizer state dropped; each quantized
    linear's weight latent or quantized."""
    layers = {name: m for name, m in net.named_modules() if isinstance(m, QuantLinear)}
    quantizer_state = tuple(f"{name}.{part}." for name in layers for part in ("weight_quantizer", "input_quantizer"))
    state = {k: v.detach() for k, v in net.state_dict().items() if not k.startswith(quantizer_state)}
    if weights == "quantized":
        state.update({f"{name}.weight": quantized_weight(name, layer) for name, layer in layers.items()})
    return state


def _check_request(out: Path, weights: str, dtype: str, force: bool) -> None:
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"--weights={weights!r} is not allowed; choose one of {', '.join(WEIGHT_CHOICES)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    check_output_dir(out, force)


def _source_dir(run_config: dict[str, Any]) -> Path | None:
    """The Hugging Face directory a model=hf run started from (its generation settings are kept)."""
    from qat.train.lifecycle import is_hf_model

    model = run_config.get("model", {})
    if not is_hf_model(model):
        return None
    from qat.hf.load import checkpoint_dir

    return checkpoint_dir(model["path"])


def write_hf_dir(net: nn.Module, tokenizer: Any, run_config: dict[str, Any], step: int, out: Path, weights: str, dtype: str) -> None:
    """Everything into the (new, empty) directory `out`."""
    from qat.train.lifecycle import quantization_metadata

    cfg = net.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's vocab_size={cfg.vocab_size}")
    tensors = {k: v.to(DTYPES[dtype]).cpu().contiguous() for k, v in hf_state_dict(plain_state(net, weights), cfg).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    token_ids = write_tokenizer(tokenizer, out, cfg.max_seq_len)
    source = _source_dir(run_config)
    if source is not None and (source / GENERATION_CONFIG).is_file():
        shutil.copyfile(source / GENERATION_CONFIG, out / GENERATION_CONFIG)
    else:
        generation = {k: v for k, v in token_ids.items() if v is not None}
        (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    meta = {**quantization_metadata(net), "exported_weights": weights, "step": int(step)}
    config = hf_config(cfg, dtype, token_ids, {METADATA_KEY: meta})
    (out / "config.json").write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")


def export_hf(ckpt: str | Path, out_dir: str | Path, weights: str = "latent", dtype: str = "float32", force: bool = False) -> Path:
    """Export a train.py checkpoint (what scripts/export_hf.py runs); returns the directory.
    Every bad input is a one-line ValueError, raised before the checkpoint is loaded."""
    from qat.train.checkpoint import checkpoint_file, load_trained  # Lightning/Hydra only for this entry point

    out, ckpt = Path(out_dir), Path(ckpt)
    _check_request(out, weights, dtype, force)
    checkpoint_file(ckpt)  # before the (slow) load
    model = load_trained(ckpt)
    with atomic_directory(out, force) as tmp:
        write_hf_dir(model.net, model.tokenizer, model.config, model.step, tmp, weights, dtype)
    return out
