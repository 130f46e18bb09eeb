"""Import a GGUF Llama (llama.cpp's file format) as a plain Hugging Face directory that
`python train.py model=hf model.path=DIR` reads (what scripts/import_gguf.py runs).

transformers' own GGUF reader does the work: it dequantizes every tensor (Q8_0, Q4_K, ...),
undoes llama.cpp's per-head q/k row permutation, rebuilds config.json from the metadata and
the tokenizer from the vocabulary and merges stored there. We never parse tensor data
ourselves. What we add:

1. Checks before anything expensive (header and metadata only, no tensor data): the file is
   a GGUF, a plain Llama, in one piece, and carries nothing transformers' reader would
   silently drop (RoPE frequency factors, linear RoPE scaling, experts, biases): a file it
   would import wrongly is refused in one line naming the key or tensor. The config it
   implies must pass our own `llama_config_from_hf`.
2. Weights loaded dequantized (`GgufConfig(dequantize=True)` in transformers >= 5, where the
   default keeps packed blocks): config.json gets no quantization_config.
3. The directory is written beside `out` and renamed into place only once it is complete and
   `check_checkpoint` / `checkpoint_tokenizer` (what model=hf runs) accept it.

The only module of qat.hf that imports transformers, and only inside functions: `pip install
-e ".[gguf]"` provides it with `gguf` and `accelerate`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from qat.hf.config import MODEL_TYPE, llama_config_from_hf
from qat.hf.load import check_checkpoint
from qat.hf.tokenizer import checkpoint_tokenizer
from qat.io import atomic_directory, check_output_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAGIC = b"GGUF"
EXTRA = "pip install -e \".[gguf]\""
REQUIRED_MODULES = ("gguf", "transformers", "accelerate")  # accelerate: transformers' gguf_file loading needs it
# Tensors transformers' reader would drop without a word, with what they carry.
DROPPED = {"rope_freqs.weight": "RoPE frequency factors (Llama 3.1+ rope scaling), which transformers' GGUF reader ignores"}


def require_extra() -> None:
    """The `gguf` extra, or one line saying how to install it."""
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"the Python package {name!r} is missing ({err}); install the gguf extra: {EXTRA}") from None


def _scalar(reader: Any, key: str) -> Any:
    """A metadata value (string or number) as Python, or None when the key is absent."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if int(field.types[0]) == 8:  # GGUFValueType.STRING: the part holds utf-8 bytes
        return bytes(part).decode("utf-8")
    return part[0].item() if len(part) == 1 else None


def plain_llama_tensors(n_layer: int) -> tuple[set[str], set[str]]:
    """(required, optional) tensor names of a plain Llama as llama.cpp writes it; `output.weight`
    is absent when the embeddings are tied."""
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES

    block = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)
    required = {f"{TENSOR_NAMES[t]}.weight" for t in (T.TOKEN_EMBD, T.OUTPUT_NORM)}
    required |= {f"{TENSOR_NAMES[t].format(bid=i)}.weight" for i in range(n_layer) for t in block}
    return required, {f"{TENSOR_NAMES[T.OUTPUT]}.weight"}


def check_file(path: Path) -> None:
    """The file exists and starts like a GGUF (no package needed for that)."""
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist; give a .gguf file written by llama.cpp")
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}; a GGUF file starts with {MAGIC!r})")


def check_metadata(path: Path) -> None:
    """Everything about the file that can be known from its header and metadata."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)  # memory-mapped: the tensor data is not read
    except Exception as err:  # gguf raises ValueError, struct.error, ... for a torn file
        raise ValueError(f"{str(path)!r} is not a readable GGUF file ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
    arch = _scalar(reader, "general.architecture")
    if arch != MODEL_TYPE:
        raise ValueError(f"{str(path)!r}: general.architecture={arch!r} is not supported; allowed: {MODEL_TYPE!r}")
    splits = _scalar(reader, "split.count")
    if splits is not None and splits > 1:
        raise ValueError(f"{str(path)!r}: split.count={splits} (one part of a split GGUF) is not supported; merge the parts into one file first (llama-gguf-split --merge)")
    scaling = _scalar(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{str(path)!r}: {arch}.rope.scaling.type={scaling!r} is not supported (transformers' GGUF reader ignores it); allowed: 'none'")
    n_layer = _scalar(reader, f"{arch}.block_count")
    if not isinstance(n_layer, int) or n_layer <= 0:
        raise ValueError(f"{str(path)!r}: {arch}.block_count={n_layer!r} must be a positive integer")
    required, optional = plain_llama_tensors(n_layer)
    names = [t.name for t in reader.tensors]
    for name in names:
        if name not in required | optional:
            why = DROPPED.get(name, "not a tensor of a plain Llama")
            raise ValueError(f"{str(path)!r}: tensor {name!r} is not supported ({why}); allowed: a plain Llama's tensors (token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down, norms, output)")
    missing = sorted(required - set(names))
    if missing:
        raise ValueError(f"{str(path)!r}: tensor {missing[0]!r} is missing ({len(missing)} missing) for {arch}.block_count={n_layer}")


def hf_config_of(path: Path) -> dict[str, Any]:
    """The config.json transformers builds from the file's metadata, checked by our own rules
    (the same ones model=hf applies) before any weight is read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True).to_dict()
    try:
        llama_config_from_hf(config)
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: the config transformers reads from it is not one our Llama computes exactly: {err}") from None
    return config


def load_dequantized(path: Path, dtype: str) -> Any:
    """transformers' LlamaForCausalLM with every weight dequantized, in `dtype`; every parameter
    must come from the file (nothing left at its random init)."""
    import transformers
    from packaging.version import Version

    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    # transformers renamed torch_dtype to dtype in 4.56; the extra allows 4.45.
    kwargs["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = DTYPES[dtype]
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5 keeps GGUF blocks packed unless told otherwise
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(key):
            raise ValueError(f"{str(path)!r}: transformers loaded it with {key}={sorted(info[key])[:3]}; the file does not describe a plain Llama")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None) is not None:
        raise AssertionError("transformers left the model quantized although dequantize=True was asked for")
    return model.eval()


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Write the GGUF Llama `gguf_file` as a save_pretrained directory `out_dir`; returns it.
    Every bad input is a one-line ValueError, raised before a weight is read."""
    path, out = Path(gguf_file).expanduser(), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    check_output_dir(out, force)
    check_file(path)
    require_extra()
    check_metadata(path)
    hf_config_of(path)
    from transformers import AutoTokenizer

    # The tokenizer first: it is cheap next to the weights and may still fail.
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = load_dequantized(path, dtype)
    with atomic_directory(out, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # What model=hf will run, on the new directory before it replaces anything.
        check_checkpoint(tmp, vocab_size=checkpoint_tokenizer(str(tmp)).vocab_size)
    return out
