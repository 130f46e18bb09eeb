"""The run config: a typed schema for train.yaml's own keys, and every check of the composed
config, each made once, before any expensive work.

Config groups carry their own schemas (`QuantizerConfig`, `LlamaConfig`, the data module);
this file owns the top-level keys (seed, compile, telemetry.*, max_tokens,
tokens_per_param, resume, skip_completed, checkpoint.*) and the facts that span groups
(batch, sequence length, accumulation, step budget, launch mode). A bad value becomes one
`ConfigError` line naming the key and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from qat.quant.config import QuantizerConfig
from qat.quant.rules import LayerRule, parse_rules

DISTRIBUTED_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS")


class ConfigError(ValueError):
    """A bad override, reported as one line before any expensive work."""


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Turn the ways a bad override surfaces (ValueError, Hydra's InstantiationException
    wrapping one, a missing ??? value, a bad group option or key when composing) into a
    one-line ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):  # nested instantiate() calls
            cause = cause.__cause__
        if isinstance(cause, (ValueError, MissingMandatoryValue)):
            raise ConfigError(_one_line(cause)) from None
        raise  # a bug in a _target_, not a bad value: its traceback is the report
    except (MissingMandatoryValue, ValueError) as err:
        raise ConfigError(_one_line(err)) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(hydra_error_line(err)) from None


def hydra_error_line(err: BaseException) -> str:
    """Hydra's several-line report of a bad group option or key (`quant=nope`,
    `checkpoint.foo=1`) as one line: the message without the config search path, and its cause."""
    text = str(err).split("Config search path")[0]  # Hydra's search path: noise for a typo
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return "; ".join(lines)[:600] or type(err).__name__


def _one_line(err: BaseException) -> str:
    if isinstance(err, MissingMandatoryValue):
        return f"missing value for {err.full_key}: set {err.full_key}=..."
    return str(err).strip().splitlines()[0]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def _check_positive_or_null(key: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{key}={value!r} must be a positive number or null")


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")


@dataclass(frozen=True)
class CheckpointConfig:
    every_n_steps: int = 100  # a checkpoint every N optimizer steps, plus last.ckpt
    keep_all: bool = True  # keep every N-step checkpoint (false: only last.ckpt)

    def __post_init__(self) -> None:
        _check_int("checkpoint.every_n_steps", self.every_n_steps, 1)
        _check_bool("checkpoint.keep_all", self.keep_all)


@dataclass(frozen=True)
class TelemetryConfig:
    every: int = 50  # quantizer statistics every N optimizer steps (0 = never)
    grad_alignment_every: int = 0  # gradient alignment every N steps (0 = never)
    final_grad_alignment: bool = False  # the alignment on a validation batch, into results.json

    def __post_init__(self) -> None:
        _check_int("telemetry.every", self.every, 0)
        _check_int("telemetry.grad_alignment_every", self.grad_alignment_every, 0)
        _check_bool("telemetry.final_grad_alignment", self.final_grad_alignment)


def _section(cfg: DictConfig, name: str, schema: type) -> Any:
    """A nested schema section from the composed config; unknown keys are refused by name."""
    values = OmegaConf.to_container(cfg[name], resolve=True) if name in cfg else {}
    allowed = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]} is not a key; allowed: {', '.join(f'{name}.{k}' for k in sorted(allowed))}")
    return schema(**values)


@dataclass(frozen=True)
class RunConfig:
    """train.yaml's top-level keys, validated once (see configs/train.yaml for their meaning)."""

    run_name: str | None = None
    seed: int = 0
    compile: bool = False
    max_tokens: float | None = None
    tokens_per_param: float | None = None
    resume: bool = True
    skip_completed: bool = False
    init_from: str | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    def __post_init__(self) -> None:
        if self.run_name is not None and (not isinstance(self.run_name, str) or not self.run_name or "/" in self.run_name):
            raise ConfigError(f"run_name={self.run_name!r} must be a non-empty name without '/' (or null)")
        _check_int("seed", self.seed, 0)
        for key in ("compile", "resume", "skip_completed"):
            _check_bool(key, getattr(self, key))
        _check_positive_or_null("max_tokens", self.max_tokens)
        _check_positive_or_null("tokens_per_param", self.tokens_per_param)
        if self.init_from is not None and (not isinstance(self.init_from, str) or not os.path.isfile(self.init_from)):
            raise ConfigError(f"init_from={self.init_from!r} is not a file; give a checkpoint of train.py or scripts/ptq.py (or null)")
        if self.max_tokens is not None and self.tokens_per_param is not None:
            raise ConfigError(f"max_tokens={self.max_tokens!r} and tokens_per_param={self.tokens_per_param!r} both set a budget; set one of them")

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> RunConfig:
        """The schema's fields from the composed config (the groups are checked elsewhere)."""
        keys = ("run_name", "seed", "compile", "max_tokens", "tokens_per_param", "resume", "skip_completed", "init_from")
        fields = {k: OmegaConf.select(cfg, k) for k in keys}
        fields = {k: v for k, v in fields.items() if v is not None or k in ("run_name", "max_tokens", "tokens_per_param", "init_from")}
        return cls(**fields, checkpoint=_section(cfg, "checkpoint", CheckpointConfig), telemetry=_section(cfg, "telemetry", TelemetryConfig))


def quantizer_configs(cfg: DictConfig) -> tuple[QuantizerConfig, QuantizerConfig]:
    """(weight, activation) configs from the `quant` group, named in errors."""
    out = []
    for side in ("weight", "activation"):
        try:
            out.append(QuantizerConfig.from_mapping(OmegaConf.to_container(cfg.quant[side], resolve=True)))
        except ValueError as err:
            raise ConfigError(f"quant.{side}: {err}") from None
    return out[0], out[1]


def quant_rules(cfg: DictConfig) -> tuple[LayerRule, ...]:
    """`quant.rules`, checked for shape here (unknown keys, bad fields); whether each pattern
    matches a layer is checked when the model is built (build_net on the meta device, free).
    A config from before rules existed has none."""
    raw = cfg.quant.get("rules")
    try:
        return parse_rules(OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def tokens_per_step(cfg: DictConfig) -> int:
    return cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.get("accumulate_grad_batches", 1)


def check_batch_shape(cfg: DictConfig) -> None:
    """data.seq_len, data.batch_size and trainer.accumulate_grad_batches: checked here only."""
    for key, minimum in (("data.seq_len", 2), ("data.batch_size", 1), ("trainer.accumulate_grad_batches", 1)):
        value = OmegaConf.select(cfg, key)
        if value is not None:
            _check_int(key, value, minimum)


class StepBudget(NamedTuple):
    steps: int
    source: str  # what decided the number, for the start-up summary and results.json


def override_key(override: str) -> str:
    """`trainer.max_steps` of a Hydra override such as `++trainer.max_steps=1`."""
    return override.split("=", 1)[0].lstrip("+~")


def resolve_max_steps(cfg: DictConfig, non_embedding_params: int, command_line: Sequence[str] = ()) -> StepBudget:
    """trainer.max_steps, or the steps that `tokens_per_param` / `max_tokens` ask for (the one
    place max_steps is checked). A trainer.max_steps typed on the command line wins over a
    token budget that a config file set (an experiment's max_tokens): it is the user's explicit
    ask, and `trainer.max_steps=1` that silently ran 488,282 steps was a trap. Both typed on the
    command line contradict each other and are refused."""
    typed = {override_key(o) for o in command_line}
    budgets = {k: cfg.get(k) for k in ("max_tokens", "tokens_per_param") if cfg.get(k) is not None}
    steps = cfg.trainer.get("max_steps")
    if "trainer.max_steps" in typed or not budgets:
        clash = sorted(k for k in budgets if k in typed)
        if clash:
            raise ConfigError(
                f"trainer.max_steps={steps!r} and {clash[0]}={budgets[clash[0]]!r} both set the length of the run on the command line; set one of them"
            )
        if not _is_int(steps) or steps < 1:
            raise ConfigError(f"trainer.max_steps={steps!r} must be an integer >= 1 (or set max_tokens / tokens_per_param)")
        ignored = "".join(f"; {k}={v!r} from the config is ignored" for k, v in budgets.items())
        return StepBudget(int(steps), f"trainer.max_steps={steps} ({'command line' if budgets or 'trainer.max_steps' in typed else 'config'}){ignored}")
    ((key, value),) = budgets.items()  # RunConfig refuses both at once
    tokens = value * non_embedding_params if key == "tokens_per_param" else value
    per_step = tokens_per_step(cfg)
    return StepBudget(max(1, math.ceil(tokens / per_step)), f"{key}={value!r}: {tokens:,.0f} tokens at {per_step:,} tokens per step")


def strategy_name(cfg: DictConfig) -> str:
    """trainer.strategy as a lower-case name: the string, or the `_target_` of a strategy object."""
    strategy = cfg.trainer.get("strategy")
    return (strategy if isinstance(strategy, str) else str(OmegaConf.select(cfg, "trainer.strategy._target_", default=""))).lower()


def check_launch(cfg: DictConfig, multirun: bool) -> None:
    """Hydra multirun + a subprocess-launching strategy would re-run the whole sweep in
    every rank; such jobs must be started by torchrun or srun (which set the ranks)."""
    name = strategy_name(cfg)
    multi = "ddp" in name or "fsdp" in name
    if multirun and multi and not any(k in os.environ for k in DISTRIBUTED_ENV):
        raise ConfigError(
            "trainer=ddp/fsdp inside a Hydra multirun must be launched by torchrun or srun "
            "(e.g. hydra/launcher=slurm); a plain multirun would re-launch the sweep in every rank"
        )


# Top-level keys a composed config may have: the config groups, the schema's own keys, Hydra's.
CONFIG_GROUPS = ("model", "quant", "distill", "lora", "data", "tokenizer", "trainer", "logger", "optimizer", "scheduler", "experiment", "sweep")
SCHEMA_KEYS = ("run_name", "seed", "compile", "max_tokens", "tokens_per_param", "resume", "skip_completed", "init_from", "checkpoint", "telemetry")


def check_known_keys(cfg: DictConfig) -> None:
    """An unknown top-level key (`+foo=1`, a typo) would be silently ignored: refuse it."""
    allowed = set(CONFIG_GROUPS) | set(SCHEMA_KEYS) | {"hydra"}
    unknown = sorted(set(cfg.keys()) - allowed)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; allowed top-level keys: {', '.join(sorted(allowed - {'hydra'}))}")


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_optimizer_and_trainer(cfg: DictConfig) -> None:
    """Numbers that Lightning and torch would accept and then misbehave on (lr 0 trains nothing)."""
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if lr is not None and not _positive_number(lr):
        raise ConfigError(f"optimizer.lr={lr!r} must be a number > 0 (or null: the model size's peak LR)")
    decay = OmegaConf.select(cfg, "optimizer.weight_decay", default=0.0)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
        raise ConfigError(f"optimizer.weight_decay={decay!r} must be a number >= 0")
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip!r} must be a number >= 0 or null")
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch  # Lightning's own message ("No supported gpu backend found!") names no fix

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator!r} but no CUDA device is visible; add trainer=cpu (or ddp_cpu, fsdp_cpu) to train on the CPU")


def check_scheduler(cfg: DictConfig) -> None:
    from qat.train.schedules import check_schedule_args

    args = {k: v for k, v in OmegaConf.to_container(cfg.scheduler, resolve=True).items() if not k.startswith("_")}
    check_schedule_args(args.pop("name", "cosine"), args)


def world_size(cfg: DictConfig) -> int:
    """Processes the run will have: the launcher's WORLD_SIZE, else devices x nodes for a
    multi-process strategy, else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    name = strategy_name(cfg)
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if ("ddp" in name or "fsdp" in name) and _is_int(devices) and _is_int(nodes):
        return devices * nodes
    return 1


def check_alignment_strategy(cfg: DictConfig, run: RunConfig, lora: bool = False) -> None:
    """Gradient alignment takes per-layer gradients of the whole weights: not of FSDP shards, and
    not of a LoRA run's frozen weights (its merged weights are formed inside the forward)."""
    if not (run.telemetry.grad_alignment_every or run.telemetry.final_grad_alignment):
        return
    if "fsdp" in strategy_name(cfg):
        raise ConfigError("telemetry.grad_alignment_every / final_grad_alignment are not supported with FSDP; use trainer=ddp or set them to 0 / false")
    if lora:
        raise ConfigError("telemetry.grad_alignment_every / final_grad_alignment are not supported with lora (the base weights are frozen); set them to 0 / false, or run scripts/grad_alignment.py on the merged checkpoint")


def check_world_divides_batch(cfg: DictConfig) -> None:
    world = world_size(cfg)
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the world size {world} (the global micro-batch is split over ranks)")
