"""Plain Llama model and its named sizes. Knows nothing about quantization."""

from models.kv_cache import KVCache
from models.llama import Llama, LlamaConfig, flops_per_token
from models.sizes import MODEL_SIZES, ModelSize, llama_config, non_embedding_params

__all__ = [
    "KVCache",
    "Llama",
    "LlamaConfig",
    "MODEL_SIZES",
    "ModelSize",
    "flops_per_token",
    "llama_config",
    "non_embedding_params",
]
