"""Every shipped config composes; every experiment's debug shrink trains a few steps."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qat.quant.rules import LayerRule
from qat.train.run_config import ConfigError, quant_rules, quantizer_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ["model", "quant", "lora", "data", "tokenizer", "trainer", "logger", "optimizer", "scheduler", "experiment", "sweep"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml")) if not p.stem.startswith("_")]
NEEDS = {("data", "local"): ["data.path=x.txt"], ("tokenizer", "hf"): ["tokenizer.path=t.json"]}
SHRINK = [
    "model=debug",
    "data=synthetic",
    "tokenizer=byte",
    "trainer=cpu",
    "logger=csv",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.val_batches=1",
    "tokens_per_param=null",
    "max_tokens=null",
    "compile=false",
]


def _compose(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS)
def test_config_composes_and_resolves(group, option):
    cfg = _compose(f"{group}={option}", *NEEDS.get((group, option), []), hydra=group == "sweep")
    for key in cfg:  # every interpolation resolves (hydra's runtime keys only exist in a real run)
        if key != "hydra":
            OmegaConf.select(cfg, key) if not OmegaConf.is_config(cfg[key]) else OmegaConf.to_container(cfg[key], resolve=True)
    weight, activation = quantizer_configs(cfg)  # the quantizer schema accepts it
    assert weight.bits == cfg.quant.weight.bits
    if group == "sweep":
        assert cfg.skip_completed and "sweep" not in cfg.hydra.sweep.dir
        assert "quant.bits" in cfg.hydra.sweeper.params  # every sweep varies the bit-width


def test_quant_presets_mean_what_they_say():
    q = {name: quantizer_configs(_compose(f"quant={name}")) for _, name in OPTIONS if _ == "quant"}
    w, a = q["quest"]
    assert (w.bits, a.bits, w.rotation, w.scale, w.grid, w.estimator) == (4, 4, "hadamard", "rms_mse", "int", "trust")
    assert not q["bf16"][0].enabled and not q["bf16"][1].enabled
    assert q["ste"][0].estimator == "ste" and q["ste"][0].rotation == "none"
    assert q["lsq"][1].scale == "lsq" and q["pact"][0].estimator == "pact"
    assert q["quest_fp4"][0].grid == "fp4" and q["quest_fp4"][1].grid == "fp4"
    assert q["quest_2of4"][0].sparsity == "2:4" and q["quest_2of4"][1].sparsity == "none"
    assert q["weight_only"][0].bits == 4 and not q["weight_only"][1].enabled
    assert q["weight_only"][1].rotation == "hadamard"  # keeps (xH)(WH)^T = x W^T
    assert q["quest_fc2_a8"] == q["quest"]  # its rules change only the FC2 inputs (test_quant_rules_in_presets...)


def test_quant_rules_in_presets_and_overrides():
    presets = [name for group, name in OPTIONS if group == "quant"]
    rules = {name: quant_rules(_compose(f"quant={name}")) for name in presets}
    assert rules.pop("quest_fc2_a8") == (LayerRule("layers.*.mlp.down", activation={"bits": 8}),)
    assert set(rules.values()) == {()}  # every other preset is uniform
    cfg = _compose("quant=quest_fc2_a8", "quant.bits=3", 'quant.rules=[{match: "layers.0.*", exclude: true}]')
    assert quant_rules(cfg) == (LayerRule("layers.0.*", exclude=True),)  # the command line replaces the list
    with pytest.raises(ConfigError, match=r"quant.rules\[0\].bits is not a rule key"):
        quant_rules(_compose('quant.rules=[{match: "*", bits: 3}]'))


def test_bits_shortcut_and_per_side_overrides():
    w, a = quantizer_configs(_compose("quant.bits=2"))
    assert (w.bits, a.bits) == (2, 2)
    w, a = quantizer_configs(_compose("quant.bits=2", "quant.weight.bits=3", "quant.activation.bits=8"))
    assert (w.bits, a.bits) == (3, 8)


def test_trainer_presets_and_arbitrary_trainer_args():
    cfg = _compose("trainer=ddp_cpu", "trainer.max_steps=7", "trainer.gradient_clip_val=0.5")
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy.process_group_backend == "gloo"
    assert (cfg.trainer.max_steps, cfg.trainer.gradient_clip_val) == (7, 0.5)
    fsdp = instantiate(_compose("trainer=fsdp").trainer.strategy)
    from lightning.pytorch.strategies import FSDPStrategy

    assert isinstance(fsdp, FSDPStrategy)


def test_slurm_launcher_composes():
    cfg = _compose("sweep=bits_x_size", "hydra/launcher=slurm", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 1 and launcher.max_num_timeout > 0
    assert launcher.submitit_folder.startswith("multirun/bits_x_size")  # stable across requeues


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_experiment_debug_shrink_trains(experiment, tmp_path):
    from train import train

    cfg = _compose(f"experiment={experiment}", *SHRINK)
    result = train(cfg, tmp_path)
    assert result["status"] == "completed" and result["step"] == 3
    assert json.loads((tmp_path / "results.json").read_text())["model"] == "debug"


def test_every_trainer_argument_is_overridable():
    import inspect

    import lightning

    owned_by_train_py = {"self", "logger", "callbacks", "plugins", "default_root_dir"}
    args = set(inspect.signature(lightning.Trainer.__init__).parameters) - owned_by_train_py
    for preset in ("cpu", "gpu", "ddp", "ddp_cpu", "fsdp"):
        assert args <= set(_compose(f"trainer={preset}").trainer), preset
    assert _compose("trainer.profiler=simple", "trainer.max_time=00:01:00:00").trainer.profiler == "simple"


def test_multirun_with_ddp_needs_torchrun_or_srun(monkeypatch):
    from qat.train.run_config import DISTRIBUTED_ENV, ConfigError, check_launch

    for key in DISTRIBUTED_ENV:
        monkeypatch.delenv(key, raising=False)
    for preset in ("ddp", "ddp_cpu", "fsdp"):
        cfg = _compose(f"trainer={preset}")
        check_launch(cfg, multirun=False)  # a single run: Lightning launches the ranks
        with pytest.raises(ConfigError, match="torchrun or srun"):
            check_launch(cfg, multirun=True)
    check_launch(_compose("trainer=cpu"), multirun=True)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    check_launch(_compose("trainer=ddp"), multirun=True)  # ranks come from SLURM


def test_token_budget_sets_max_steps():
    from qat.train.run_config import resolve_max_steps

    cfg = _compose("data.batch_size=16", "data.seq_len=128", "trainer.accumulate_grad_batches=2")
    assert resolve_max_steps(cfg, 1000).steps == cfg.trainer.max_steps
    assert resolve_max_steps(_compose("max_tokens=40960", "data.batch_size=16", "data.seq_len=128"), 1000).steps == 20
    # 100 tokens per parameter for 426,624 parameters at 4,096 tokens per step -> ceil(10415.6)
    cfg = _compose("tokens_per_param=100", "data.batch_size=16", "data.seq_len=128", "trainer.accumulate_grad_batches=2")
    budget = resolve_max_steps(cfg, 426_624)
    assert budget.steps == 10_416 and budget.source.startswith("tokens_per_param=100: 42,662,400 tokens at 4,096 tokens per step")


def test_max_steps_on_the_command_line_wins_over_a_config_budget():
    """`experiment=qat_finetune ... trainer.max_steps=1` ran the experiment's 500M tokens."""
    from qat.train.run_config import ConfigError, resolve_max_steps

    typed = ["experiment=quest_30m_w4a4", "trainer.max_steps=1"]  # the experiment sets tokens_per_param=100
    budget = resolve_max_steps(_compose(*typed), 1000, typed)
    assert budget.steps == 1
    assert budget.source == "trainer.max_steps=1 (command line); tokens_per_param=100 from the config is ignored"
    assert resolve_max_steps(_compose(typed[0]), 1000, typed[:1]).source.startswith("tokens_per_param=100: 100,000 tokens")
    for both in (["trainer.max_steps=5", "max_tokens=4096"], ["++trainer.max_steps=5", "+tokens_per_param=3"]):
        with pytest.raises(ConfigError, match=r"^trainer.max_steps=5 and (max_tokens=4096|tokens_per_param=3) both set the length of the run on the command line; set one of them$"):
            resolve_max_steps(_compose(*both), 1000, both)


def test_an_experiment_keeps_the_quant_preset_a_user_picks():
    """`experiment=qat_finetune quant=bf16` trained W4A4: the experiment set quant.bits=4."""
    cfg = _compose("experiment=qat_finetune", "model.path=x", "quant=bf16")
    assert cfg.quant.weight.bits == cfg.quant.activation.bits == 16
    assert _compose("experiment=qat_finetune", "model.path=x").quant.weight.bits == 4


@pytest.mark.parametrize("data", ["synthetic", "local"])
def test_the_runs_seed_sets_the_data_order_unless_data_seed_is_given(data):
    """A second seed of a fine-tune from fixed pretrained weights differs only in its data order:
    `seed=1` alone must change it (it once changed nothing there), `data.seed` still wins."""
    def resolved(*overrides):
        return OmegaConf.to_container(_compose(f"data={data}", *overrides), resolve=True)["data"]["seed"]

    assert resolved() == 0 and resolved("seed=1") == 1 and resolved("seed=1", "data.seed=5") == 5
