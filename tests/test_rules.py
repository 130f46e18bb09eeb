"""Per-layer rules: they resolve as documented (in order, later fields win, the last match
decides exclusion, a pattern matching nothing is an error), reach the model, the checkpoint,
results.json, the packed export and the precision key; older checkpoints still load; and
(slow) a mixed run trains, resumes and sweeps like a uniform one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY, run_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat.data.tokenizer import ByteTokenizer
from qat.quant.config import QuantizerConfig
from qat.quant.convert import quantize_model
from qat.quant.linear import QuantLinear
from qat.quant.rules import LayerRule, format_rules, parse_rules, resolve_layers, rules_dirname
from qat.scaling.precision import LayerPrecision, run_precision
from qat.train.checkpoint import config_differences, load_trained
from qat.train.lifecycle import build_net, quantization_metadata, quantization_summary
from qat.train.run_config import ConfigError, quant_rules

CONFIGS = ROOT / "configs"
NAMES = [f"layers.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")]
W3 = QuantizerConfig(bits=3)


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _resolve(*rules):
    return resolve_layers(NAMES, W3, W3, parse_rules(list(rules)))


def test_later_rules_win_and_fields_merge():
    out = _resolve(
        {"match": "layers.*.mlp.*", "activation": {"bits": 8}},
        {"match": "layers.*.mlp.down", "activation": {"bits": 6}, "weight": {"bits": 4}},
        {"match": "layers.1.mlp.down", "weight": {"bits": 2}},
    )
    bits = {n: (q.weight.bits, q.activation.bits) for n, q in out.items()}
    assert bits["layers.0.attn.qkv"] == (3, 3)  # untouched
    assert bits["layers.0.mlp.up"] == (3, 8)
    assert bits["layers.0.mlp.down"] == (4, 6)  # the later rule's activation bits win
    assert bits["layers.1.mlp.down"] == (2, 6)  # weight from the last rule, activation kept from the one before
    assert list(out) == NAMES


def test_exclusion_and_the_last_matching_rule_decides_it():
    out = _resolve({"match": "layers.0.*", "exclude": True}, {"match": "layers.0.mlp.down", "activation": {"bits": 8}})
    assert [n for n, q in out.items() if q is None] == [f"layers.0.{m}" for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up")]
    assert out["layers.0.mlp.down"].activation.bits == 8  # a later rule quantizes it again
    out = _resolve({"match": "*", "exclude": True}, {"match": "layers.1.*", "exclude": False})
    assert [n for n, q in out.items() if q is not None] == NAMES[5:]


@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"match": "layers.*.mlp.dwn", "activation": {"bits": 8}}], "quant.rules[0] match='layers.*.mlp.dwn' matches no quantizable layer"),
        ([{"match": "*", "weight": {"bits": 4}}, {"match": "lm_head", "weight": {"bits": 8}}], "quant.rules[1] match='lm_head' matches no"),
        ([{"match": "*", "wieght": {"bits": 4}}], "quant.rules[0].wieght is not a rule key"),
        ([{"match": "*", "weight": {"bitz": 4}}], "quant.rules[0] (match='*').weight.bitz is not a quantizer field"),
        ([{"match": "", "weight": {"bits": 4}}], "quant.rules[0].match='' must be a non-empty glob"),
        ([{"match": "*", "exclude": True, "weight": {"bits": 4}}], "exclude=true keeps the layer a plain nn.Linear"),
        ([{"match": "*"}], "changes nothing"),
        ([{"match": "*", "exclude": "yes"}], "exclude='yes' must be true or false"),
        ([{"match": "layers.0.*", "weight": {"bits": 9}}], "layer layers.0.attn.qkv (quant.rules [0]) weight: bits=9 is not allowed"),
        ({"match": "*"}, "quant.rules={'match': '*'} must be a list of rules"),
    ],
)
def test_bad_rules_are_one_line_errors(rules, message):
    with pytest.raises(ValueError) as err:
        resolve_layers(NAMES, W3, W3, parse_rules(rules))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_quantize_model_applies_rules_exactly():
    net = Llama(llama_config("debug", vocab_size=64, max_seq_len=32))
    rules = parse_rules([{"match": "layers.1.*", "exclude": True}, {"match": "layers.*.mlp.down", "activation": {"bits": 8}}])
    swapped = quantize_model(net, W3, W3, rules=rules)
    assert swapped == NAMES[:5] + ["layers.1.mlp.down"]
    assert type(net.layers[1].mlp.up) is nn.Linear and type(net.lm_head) is nn.Linear
    assert net.layers[1].mlp.down.input_quantizer.cfg.bits == 8 and net.layers[0].mlp.up.input_quantizer.cfg.bits == 3
    meta = quantization_metadata(net)
    assert list(meta["layers"]) == swapped and meta["excluded"] == NAMES[5:9]
    assert meta["layers"]["layers.1.mlp.down"]["activation"]["bits"] == 8
    assert meta["weight"] == W3.to_dict() and meta["activation"] == W3.to_dict()  # the configs most parameters carry
    summary = quantization_summary(net)
    assert summary[0] == "quantization: 10 block linears, 3 distinct config(s)" and len(summary) == 4
    assert "input 8-bit" in summary[2] and "excluded" in summary[3]  # in model order of first appearance


def test_rules_from_presets_and_from_the_command_line():
    cfg = _compose("quant=quest_fc2_a8", "quant.bits=3")
    net = build_net(cfg, 256, device="meta")
    inputs = {n: m.input_quantizer.cfg.bits for n, m in net.named_modules() if isinstance(m, QuantLinear)}
    assert inputs == {n: 8 if n.endswith("mlp.down") else 3 for n in NAMES}
    text = '[{match: "layers.*.mlp.down", activation: {bits: 8}}, {match: layers.0.attn.qkv, exclude: true}]'
    cfg = _compose(f"quant.rules={text}")
    assert [r.to_dict() for r in quant_rules(cfg)] == yaml.safe_load(text)
    assert type(build_net(cfg, 256, device="meta").layers[0].attn.qkv) is nn.Linear
    with pytest.raises(ConfigError, match=r"quant.rules\[0\] \(match='\*'\).weight=4 must be a mapping"):
        quant_rules(_compose('quant.rules=[{match: "*", weight: 4}]'))
    assert quant_rules(_compose()) == ()  # every preset starts with no rules


def test_format_rules_is_yaml_and_a_hydra_override_value():
    rules = [LayerRule("layers.0.mlp.down", weight={"bits": 2}), LayerRule("layers.*.attn.*", weight={"bits": 1.58}, activation={"bits": 8}),
             LayerRule("layers.1.mlp.up", exclude=True)]  # fmt: skip
    text = format_rules(rules)
    assert "\n" not in text and yaml.safe_load(text) == [r.to_dict() for r in rules]
    assert [r.to_dict() for r in quant_rules(_compose(f"quant.rules={text}"))] == [r.to_dict() for r in rules]


def test_rules_dirname_is_a_stable_digest():
    a = [{"match": "layers.*.mlp.down", "activation": {"bits": 8}}]
    assert rules_dirname("quant.bits=3", []) == "quant.bits=3" and rules_dirname("", None) == ""
    assert rules_dirname("quant.bits=3", a) == rules_dirname("quant.bits=3", json.loads(json.dumps(a)))
    assert rules_dirname("", a).startswith("rules=") and rules_dirname("x=1", a).startswith("x=1,rules=")
    assert rules_dirname("", a) != rules_dirname("", [{**a[0], "activation": {"bits": 6}}])


def test_precision_key_uniform_unchanged_and_mixed_weighted():
    w4, a16 = QuantizerConfig(bits=4), QuantizerConfig(bits=16)
    assert run_precision([LayerPrecision(10, w4, w4)] * 3) == ("w4a4", 4.0, 4.0, 4.0)
    assert run_precision([LayerPrecision(10, w4, a16)] * 2) == ("w4a16", 4.0, 16.0, 4.0)
    nohad = QuantizerConfig(bits=2, rotation="none")
    assert run_precision([LayerPrecision(5, nohad, nohad)]).key == "w2a2-nohad"
    # 300 params at W3A3, 100 at W3A8 -> a = (900 + 800) / 400 = 4.25; an excluded layer counts 16/16.
    w3, a8 = QuantizerConfig(bits=3), QuantizerConfig(bits=8)
    assert run_precision([LayerPrecision(300, w3, w3), LayerPrecision(100, w3, a8)]) == ("w3a4.25-mixed", 3.0, 4.25, 3.0)
    mixed = run_precision([LayerPrecision(300, w3, w3), LayerPrecision(100, None, None)])
    assert mixed == ("w6.25a6.25-mixed", 6.25, 6.25, 6.25)
    assert run_precision([LayerPrecision(3, nohad, nohad), LayerPrecision(1, w3, w3)]).key == "w2.25a2.25-mixed-nohad"
    assert run_precision([LayerPrecision(1, None, None)]).key == "bf16"


def _fake_checkpoint(path: Path, cfg, net, quantization) -> None:
    torch.save({"global_step": 3, "config": OmegaConf.to_container(cfg, resolve=True), "quantization": quantization,
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)  # fmt: skip


def test_checkpoints_old_and_new_load(tmp_path):
    cfg = _compose("quant.bits=3", "data.seq_len=32")
    net = build_net(cfg, ByteTokenizer().vocab_size)
    meta = quantization_metadata(net)
    # Before rules: no quant.rules in the config, `layers` a list of names, no `excluded`.
    old_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    del old_cfg.quant["rules"]
    _fake_checkpoint(tmp_path / "old.ckpt", old_cfg, net, {"weight": meta["weight"], "activation": meta["activation"], "layers": list(meta["layers"])})
    loaded = load_trained(tmp_path / "old.ckpt")
    assert all(m.weight_quantizer.cfg.bits == 3 for m in loaded.net.modules() if isinstance(m, QuantLinear))
    assert config_differences(OmegaConf.to_container(old_cfg), OmegaConf.to_container(cfg, resolve=True)) == []  # resumes
    # New: a mixed config, `layers` a mapping; a mismatch with the rebuilt model is refused.
    mixed = _compose("quant=quest_fc2_a8", "quant.bits=3", "data.seq_len=32")
    net = build_net(mixed, ByteTokenizer().vocab_size)
    _fake_checkpoint(tmp_path / "new.ckpt", mixed, net, quantization_metadata(net))
    loaded = load_trained(tmp_path / "new.ckpt")
    assert loaded.net.layers[1].mlp.down.input_quantizer.cfg.bits == 8
    bad = quantization_metadata(net)
    bad["layers"]["layers.0.mlp.down"]["activation"]["bits"] = 3
    _fake_checkpoint(tmp_path / "bad.ckpt", mixed, net, bad)
    with pytest.raises(ValueError, match="layer layers.0.mlp.down was trained with other quantizer configs"):
        load_trained(tmp_path / "bad.ckpt")


def test_packed_export_of_a_mixed_model_matches(tmp_path):
    from qat.packed.export import export_packed
    from qat.packed.load import load_packed

    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=257, max_seq_len=64))
    rules = parse_rules([{"match": "*.mlp.*", "weight": {"bits": 2}}, {"match": "*.down", "activation": {"bits": 8}}, {"match": "*.proj", "exclude": True}])
    quantize_model(net, QuantizerConfig(bits=4), QuantizerConfig(bits=4), rules=rules)
    net = net.double().eval()
    out = export_packed(net, ByteTokenizer(), {"note": "test"}, 1, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert "layers.0.attn.proj" not in config["layers"] and config["layers"]["layers.0.mlp.down"]["activation"]["bits"] == 8
    assert config["layers"]["layers.0.mlp.up"]["weight"]["bits"] == 2 and config["layers"]["layers.0.attn.qkv"]["weight"]["bits"] == 4
    packed = load_packed(out).net
    prompt = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        ref, got = net(prompt), packed(prompt)
    assert (got - ref).abs().max() <= 1e-9 * ref.abs().max()


# --- slow: train.py end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_mixed_run_trains_resumes_and_records(tmp_path):
    run = tmp_path / "run"
    first = run_train(run, "quant=quest_fc2_a8", "quant.bits=3", "trainer.max_steps=6")
    assert "2 layers" in first.stdout and "input 8-bit" in first.stdout  # the start-up summary
    again = run_train(run, "quant=quest_fc2_a8", "quant.bits=3", "trainer.max_steps=12")
    assert "resumed from step 6" in again.stdout
    r = json.loads((run / "results.json").read_text())
    assert r["status"] == "completed" and r["step"] == 12 and r["resumed_from_step"] == 6
    assert (r["precision"], r["w_bits"], r["a_bits"], r["memory_bits"]) == ("w3a4.15-mixed", 3.0, 4.15, 3.0)
    assert r["quantization"]["layers"]["layers.1.mlp.down"]["activation"]["bits"] == 8
    assert r["quantization"]["rules"] == [{"match": "layers.*.mlp.down", "activation": {"bits": 8}}]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["quantization"]["layers"]["layers.0.mlp.down"]["activation"]["bits"] == 8
    assert ckpt["quantization"]["layers"]["layers.0.mlp.up"]["activation"]["bits"] == 3


@pytest.mark.slow
def test_sweep_over_rules_gets_one_directory_each(tmp_path):
    rules = '[{match: "layers.*.mlp.down", activation: {bits: 8}}]'
    cmd = [sys.executable, "train.py", "-m", *TINY, "trainer.max_steps=2", "model=debug-xs", f"hydra.sweep.dir={tmp_path}",
           "skip_completed=true", "quant.bits=3", f"quant.rules=[],{rules}"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    results = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")}
    assert sorted(r["precision"] for r in results.values()) == ["w3a3", "w3a4.15-mixed"]
    plain, tagged = sorted(results, key=len)
    assert tagged.startswith(plain + ",rules=")  # the same overrides, plus the rules' digest
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    assert again.stdout.count("skipping") == 2
