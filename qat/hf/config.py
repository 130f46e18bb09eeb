"""Hugging Face `LlamaForCausalLM` config.json <-> our `LlamaConfig`.

Reading accepts both layouts transformers has written: `rope_theta` + `rope_scaling`
(4.x) and `rope_parameters` (5.x). A field we cannot honour exactly is a one-line
ValueError naming the field and its value: nothing is approximated. Missing optional
fields take transformers' own LlamaConfig defaults, so both libraries read one file alike.
Writing uses the 4.x layout, which transformers 4.43+ and 5.x both read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qat.models.llama import LlamaConfig
from qat.models.rope import RopeScaling

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# transformers' LlamaConfig defaults for the optional fields we read.
HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False}
# Settings that change the computation and that our Llama does not implement: (field, what we need).
MUST_BE = (
    ("hidden_act", "silu"),
    ("attention_bias", False),
    ("mlp_bias", False),
    ("sliding_window", None),
    ("use_sliding_window", False),
    ("attention_dropout", 0.0),
    ("quantization_config", None),
)
LLAMA3_KEYS = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
               "original_max_position_embeddings": "original_max_seq_len"}  # HF key -> RopeScaling field
ROPE_IGNORED = {"rope_type", "type", "rope_theta", "attention_factor"}  # keys read elsewhere, or fixed by the type


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json {key}={value!r}: must be a positive int")
    return value


def _positive_number(hf: Mapping[str, Any], key: str) -> float:
    value = hf.get(key, HF_DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"config.json {key}={value!r}: must be a positive number")
    return float(value)


def check_supported(hf: Mapping[str, Any]) -> None:
    """Reject every config.json field whose value our Llama would not compute exactly."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json model_type={hf.get('model_type')!r} is not supported; allowed: {MODEL_TYPE!r}")
    archs = hf.get("architectures")
    if archs is not None and list(archs) != [ARCHITECTURE]:
        raise ValueError(f"config.json architectures={archs!r} is not supported; allowed: [{ARCHITECTURE!r}]")
    for key, allowed in MUST_BE:
        value = hf.get(key, allowed)
        if value != allowed or isinstance(value, bool) != isinstance(allowed, bool):
            raise ValueError(f"config.json {key}={value!r} is not supported; our Llama needs {key}={allowed!r}")


def rope_settings(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either layout; a RoPE type other than default/llama3 is an error."""
    params = hf.get("rope_parameters")
    scaling = params if params is not None else hf.get("rope_scaling")
    theta_source = params if params is not None and "rope_theta" in params else hf
    theta = _positive_number(theta_source, "rope_theta")
    if scaling is None:
        return theta, None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"config.json rope_scaling={scaling!r}: must be a mapping or null")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json rope type {kind!r} is not supported; allowed: {', '.join(map(repr, SUPPORTED_ROPE_TYPES))}")
    allowed = ROPE_IGNORED | (set(LLAMA3_KEYS) if kind == "llama3" else set())
    extra = sorted(k for k in scaling if k not in allowed and not (k == "partial_rotary_factor" and scaling[k] == 1.0))
    if extra:
        raise ValueError(f"config.json rope field {extra[0]}={scaling[extra[0]]!r} is not supported with rope type {kind!r}")
    if scaling.get("attention_factor", 1.0) != 1.0:
        raise ValueError(f"config.json rope field attention_factor={scaling['attention_factor']!r} is not supported; allowed: 1.0")
    if kind == "default":
        return theta, None
    missing = [k for k in LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"config.json rope type 'llama3' lacks {missing[0]}; it needs {', '.join(LLAMA3_KEYS)}")
    try:
        return theta, RopeScaling(**{ours: scaling[theirs] for theirs, ours in LLAMA3_KEYS.items()})
    except ValueError as err:
        raise ValueError(f"config.json {err}") from None


def llama_config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    """Our LlamaConfig for a Hugging Face Llama config.json (already parsed)."""
    check_supported(hf)
    theta, scaling = rope_settings(hf)
    d_model, n_head = _positive_int("hidden_size", hf.get("hidden_size")), _positive_int("num_attention_heads", hf.get("num_attention_heads"))
    # Absent or null: hidden / heads (transformers' rule); the integer division is checked below.
    head_dim = _positive_int("head_dim", hf["head_dim"] if hf.get("head_dim") is not None else d_model // n_head)
    n_kv_head = hf["num_key_value_heads"] if hf.get("num_key_value_heads") is not None else n_head
    tie = hf.get("tie_word_embeddings", HF_DEFAULTS["tie_word_embeddings"])
    if not isinstance(tie, bool):
        raise ValueError(f"config.json tie_word_embeddings={tie!r}: must be true or false")
    try:
        return LlamaConfig(
            vocab_size=_positive_int("vocab_size", hf.get("vocab_size")),
            n_layer=_positive_int("num_hidden_layers", hf.get("num_hidden_layers")),
            d_model=d_model,
            n_head=n_head,
            n_kv_head=_positive_int("num_key_value_heads", n_kv_head),
            ffn_hidden=_positive_int("intermediate_size", hf.get("intermediate_size")),
            max_seq_len=_positive_int("max_position_embeddings", hf.get("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"])),
            rope_theta=theta,
            norm_eps=_positive_number(hf, "rms_norm_eps"),
            tie_embeddings=tie,
            head_size=None if head_dim * n_head == d_model else head_dim,
            rope_scaling=scaling,
        )
    except ValueError as err:
        raise ValueError(f"config.json describes a model our Llama cannot build: {err}") from None


def hf_config(cfg: LlamaConfig, dtype: str, token_ids: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """config.json for `cfg` as a plain LlamaForCausalLM. token_ids: bos/eos/pad ids (None
    entries are left out); extra: more top-level keys (our quantization metadata)."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = {"rope_type": "llama3", **{theirs: getattr(s, ours) for theirs, ours in LLAMA3_KEYS.items()}}
    out.update({k: v for k, v in token_ids.items() if v is not None})
    out.update(extra)
    return out
