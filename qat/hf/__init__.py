"""Hugging Face Llama checkpoints: import a local `save_pretrained` directory as our Llama,
export a trained (fake-quantized) one back for plain transformers.

    config.py     config.json <-> LlamaConfig (what we accept, what we write)
    convert.py    tensor names, the fused qkv, the per-head RoPE row permutation
    load.py       read a directory: config, single file or shards, checks, weights
    tokenizer.py  the checkpoint's tokenizer; ours written for AutoTokenizer
    export.py     a train.py checkpoint -> a directory transformers loads

Nothing here imports transformers; it is only the tests' reference.
"""

from qat.hf.config import hf_config, llama_config_from_hf
from qat.hf.load import check_checkpoint, load_hf_llama

__all__ = ["check_checkpoint", "hf_config", "llama_config_from_hf", "load_hf_llama"]
