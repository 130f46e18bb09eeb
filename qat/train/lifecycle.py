"""The lifecycle's builders, in one place: plain model -> initialised -> quantized, and the
data module.

`build_net` is what train.py, checkpoint loading, the benchmarks and export all call, so a
model is built and converted the same way everywhere; `build_datamodule` is what train.py and
every script that reads batches call, so a bad corpus is refused the same way everywhere.
Compiling and wrapping for the trainer come after them, in train.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.models.sizes import MODEL_SIZES, llama_config
from qat.models.llama import Llama, LlamaConfig
from qat.hf.load import check_checkpoint, load_hf_llama
from qat.quant.config import QuantizerConfig
from qat.quant.convert import default_filter, quantize_model
from qat.quant.hadamard import check_block
from qat.quant.linear import QuantLinear
from qat.quant.rules import LayerQuant
from qat.scaling.precision import LayerPrecision
from qat.train.run_config import config_errors, quant_rules

# Models above this many parameters are built on the meta device (no memory, no default
# init) and materialised once: the default nn.Linear init of a billion-parameter model
# costs minutes on a CPU and is overwritten anyway. Smaller models are built directly, so
# their weights (and every recorded loss curve) do not depend on this switch.
META_BUILD_PARAMS = 100_000_000


def net_config(model: Mapping[str, Any], vocab_size: int, max_seq_len: int) -> LlamaConfig:
    """LlamaConfig from the `model` group (size name plus field overrides)."""
    return llama_config(vocab_size=vocab_size, max_seq_len=max_seq_len, **dict(model))


def build_plain_net(cfg: LlamaConfig) -> Llama:
    """The plain model, initialised (QuEST init), on the CPU."""
    with torch.device("meta"):
        probe = Llama(cfg)
    if probe.num_params(non_embedding=False) <= META_BUILD_PARAMS:
        return Llama(cfg)
    probe.to_empty(device="cpu")
    probe.init_weights()
    return probe


def check_quantizable(net: nn.Module) -> None:
    """Every quantized layer's dims against its own quantizer configs, once, at build time."""
    for name, layer in net.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        for side, qcfg in (("weight", layer.weight_quantizer.cfg), ("activation", layer.input_quantizer.cfg)):
            dim = layer.in_features
            try:
                if qcfg.rotation == "hadamard":
                    check_block(dim, qcfg.block_for(dim))
                if qcfg.granularity != "row" and dim % qcfg.granularity:
                    raise ValueError(f"granularity={qcfg.granularity} does not divide the input dim {dim}")
                if qcfg.sparsity == "2:4" and dim % 4:
                    raise ValueError(f"sparsity='2:4' needs an input dim divisible by 4, got {dim}")
            except ValueError as err:
                raise ValueError(f"quant.{side} on layer {name} (input dim {dim}): {err}") from None


# --- Hugging Face checkpoints (model=hf): architecture and weights from model.path -------------
HF_MODEL = "hf"
HF_MODEL_KEYS = ("size", "path", "peak_lr", "hadamard_block")  # the last: read by the quant presets


def is_hf_model(model: Mapping[str, Any]) -> bool:
    """`model=hf`: a local Hugging Face Llama directory instead of a size-table row."""
    return model.get("size") == HF_MODEL


def pretrained_path(model: Mapping[str, Any], needs: str, instead: str) -> str:
    """model=hf's model.path, the pretrained weights a run starts from. A from-scratch model (a
    size-table row) has none: one line saying what `needs` them and what to do `instead`
    (distill=kd's teacher, a LoRA run's base)."""
    if is_hf_model(model):
        return model["path"]
    raise ValueError(
        f"{needs}, and model.size={model.get('size')!r} is trained from scratch; "
        f"fine-tune a pretrained model (model=hf model.path=DIR) or {instead}"
    )


def check_model(cfg: DictConfig) -> None:
    """model.size is a size-table row, or model=hf names a checkpoint we can load (files,
    config and tensor headers only: no weights are read). One line for anything else."""
    model = cfg.model
    if not is_hf_model(model):
        if model.size not in MODEL_SIZES:
            raise ValueError(f"model.size={model.size!r} is not allowed; choose one of {', '.join(MODEL_SIZES)}")
        return
    unknown = sorted(set(model) - set(HF_MODEL_KEYS))
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not a key of model=hf (config.json fixes the architecture); allowed: {', '.join(HF_MODEL_KEYS)}")
    check_checkpoint(model.path, seq_len=cfg.data.seq_len)


def peak_lr(model: Mapping[str, Any]) -> float:
    """The LR when optimizer.lr is null: the size table's, or model=hf's own `peak_lr`."""
    return float(model["peak_lr"]) if is_hf_model(model) else MODEL_SIZES[model["size"]].peak_lr


def model_config(model: Mapping[str, Any], vocab_size: int, max_seq_len: int) -> LlamaConfig:
    """`net_config`, or for model=hf the checkpoint's (its config.json and headers only)."""
    if is_hf_model(model):
        return check_checkpoint(model["path"], vocab_size=vocab_size)[0]
    return net_config(model, vocab_size, max_seq_len)
# --- end Hugging Face checkpoints ----------------------------------------------------------------


def build_net(cfg: DictConfig | Mapping[str, Any], vocab_size: int, device: str | torch.device = "cpu") -> nn.Module:
    """The model a run trains: `cfg.model` built plain, initialised (model=hf: the checkpoint's
    weights), then every block linear swapped for a QuantLinear with `cfg.quant`'s weight and
    activation configs as `cfg.quant.rules` changes them per layer (qat/quant/rules.py).

    device="meta" builds the same structure with no memory and no init: a free check of
    every layer's dims against the quantizers before any data is read."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    net_cfg = model_config(model, vocab_size, cfg.data.seq_len)
    if str(device) == "meta":
        with torch.device("meta"):
            net = Llama(net_cfg)
    elif is_hf_model(model):
        net = load_hf_llama(model["path"], vocab_size=vocab_size)  # pretrained: no random init
    else:
        net = build_plain_net(net_cfg)
    weight, activation = (QuantizerConfig.from_mapping(OmegaConf.to_container(cfg.quant[s], resolve=True)) for s in ("weight", "activation"))
    # Per-layer rules (checkpoints from before them have none: every layer as the preset).
    quantize_model(net, weight, activation, rules=quant_rules(cfg))
    check_quantizable(net)
    return net


def build_datamodule(data: DictConfig | Mapping[str, Any], tokenizer: Any, stage: str | None = None, prepare: bool = True, **overrides: Any) -> Any:
    """The data module of a `data` config (`overrides` replace its keys), its text tokenized
    into the cache (`prepare`: rank 0 only under DDP) and, with a `stage`, set up. Every bad
    data value (a missing, empty or one-document corpus, a batch larger than the corpus, a file
    that is not UTF-8) fails here as one ConfigError line, before any model work; Hydra would
    otherwise wrap the data module's own error in two InstantiationExceptions."""
    from hydra.utils import instantiate

    with config_errors():
        dm = instantiate(data if isinstance(data, DictConfig) else OmegaConf.create(dict(data)), tokenizer=tokenizer, **overrides)
        if prepare:
            dm.prepare_data()
        if stage is not None:
            dm.setup(stage)
    return dm


# Wrappers that FSDP and activation checkpointing insert into module names; a layer's name
# in a checkpoint is the plain model's, whatever wrapped it during training.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def block_linears(net: nn.Module) -> dict[str, nn.Linear]:
    """Every layer quantize_model may swap (QuantLinear now, or nn.Linear a rule excluded),
    by its plain-model name."""
    return {
        plain_name(name): m
        for name, m in net.named_modules()
        if isinstance(m, QuantLinear) or (type(m) is nn.Linear and name and default_filter(m, plain_name(name)))
    }


def layer_quants(net: nn.Module) -> dict[str, LayerQuant | None]:
    """Each block linear's configs, read off the layer itself (None: excluded, plain)."""
    return {
        name: LayerQuant(m.weight_quantizer.cfg, m.input_quantizer.cfg) if isinstance(m, QuantLinear) else None
        for name, m in block_linears(net).items()
    }


def layer_precisions(net: nn.Module) -> list[LayerPrecision]:
    """(weight parameters, weight config, activation config) of every block linear, for the
    parameter-weighted bits of a mixed-precision run (qat.scaling.precision)."""
    quants = layer_quants(net)
    return [
        LayerPrecision(m.weight.numel(), *((q.weight, q.activation) if (q := quants[name]) else (None, None)))
        for name, m in block_linears(net).items()
    ]


def _config_key(quant: LayerQuant | None) -> str:
    """Equal exactly when two layers' resolved configs are equal (None: excluded)."""
    return "excluded" if quant is None else json.dumps(quant.to_dict(), sort_keys=True)


def _groups(net: nn.Module) -> dict[str, tuple[LayerQuant | None, list[str], int]]:
    """Distinct resolved configs in model order: (configs, layer names, weight params)."""
    linears = block_linears(net)
    out: dict[str, tuple[LayerQuant | None, list[str], int]] = {}
    for name, quant in layer_quants(net).items():
        key = _config_key(quant)
        _, names, params = out.get(key, (quant, [], 0))
        out[key] = (quant, [*names, name], params + linears[name].weight.numel())
    return out


def quantization_metadata(net: nn.Module) -> dict[str, Any]:
    """What the checkpoint records of the quantization, read off the net's own layers:
    `layers` maps each quantized layer to its resolved {"weight", "activation"} configs,
    `excluded` lists the block linears a rule kept plain, and the top-level `weight` /
    `activation` are the configs most weight parameters carry (a uniform run's only ones).
    Checkpoints from before per-layer rules hold `layers` as a list of names and no `excluded`."""
    quants = layer_quants(net)
    quantized = [(params, quant) for quant, _, params in _groups(net).values() if quant is not None]
    main = max(quantized, key=lambda g: g[0])[1] if quantized else None  # the first on a tie
    plain = QuantizerConfig.from_mapping(None).to_dict()
    return {
        "weight": main.weight.to_dict() if main else plain,
        "activation": main.activation.to_dict() if main else plain,
        "layers": {name: q.to_dict() for name, q in quants.items() if q is not None},
        "excluded": [name for name, q in quants.items() if q is None],
    }


def describe(cfg: QuantizerConfig) -> str:
    """One quantizer config in a few words, for the start-up summary."""
    if not cfg.enabled:
        return "16-bit" + (f" {cfg.rotation}" if cfg.rotation != "none" else "")
    extra = [f"g{cfg.granularity}"] if cfg.granularity != "row" else []
    extra += [cfg.sparsity] if cfg.sparsity != "none" else []
    extra += ["asymmetric"] if cfg.asymmetric else []
    extra += [f"{cfg.scale_update} scale"] if cfg.holds_scale else []
    return " ".join([f"{cfg.bits:g}-bit", cfg.rotation, cfg.scale, cfg.grid, cfg.estimator, *extra])


def quantization_summary(net: nn.Module) -> list[str]:
    """One line per distinct resolved config, with its layer and parameter counts."""
    groups = _groups(net)
    lines = [f"quantization: {len(block_linears(net))} block linears, {len(groups)} distinct config(s)"]
    for quant, names, params in groups.values():
        text = "excluded (plain nn.Linear)" if quant is None else f"weight {describe(quant.weight)} | input {describe(quant.activation)}"
        example = names[0] + (", ..." if len(names) > 1 else "")
        lines.append(f"  {len(names):4d} layers {params:>13,} params  {text}  [{example}]")
    return lines
