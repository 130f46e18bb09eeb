"""scripts/layer_sensitivity.py: targets by layer and by type, probes that change only the
probed quantizers and restore them, zero rise at the trained width, the CSV / heat-map
outputs; and (slow) the whole path: train -> sensitivity -> allocate_bits -> train the rules."""

import csv
import importlib.util
import json

import pytest
import torch
from conftest import ROOT, run_train

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat.quant.allocation import SENSITIVITY_COLUMNS
from qat.quant.config import QuantizerConfig
from qat.quant.convert import quantize_model


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sens = script("layer_sensitivity")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Llama(llama_config("debug", vocab_size=64, max_seq_len=32))
    quantize_model(model, QuantizerConfig(bits=3), QuantizerConfig(bits=3))
    return model.eval()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [(x[:, :-1], x[:, 1:]) for x in (torch.randint(0, 64, (2, 17), generator=g) for _ in range(2))]


def test_targets_by_layer_and_by_type(net):
    by_layer = sens.sensitivity_targets(net, "layer")
    assert list(by_layer)[:2] == ["layers.0.attn.qkv", "layers.0.attn.proj"] and len(by_layer) == 10
    by_type = sens.sensitivity_targets(net, "type")
    assert by_type == {f"layers.*.{m}": [f"layers.{i}.{m}" for i in range(2)] for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")}
    with pytest.raises(ValueError, match="--by='block' is not allowed"):
        sens.sensitivity_targets(net, "block")


def test_probe_changes_only_its_quantizers_and_restores_them(net):
    before = {n: (m.weight_quantizer, m.input_quantizer) for n, m in net.named_modules() if hasattr(m, "weight_quantizer")}
    with sens.probing(net, ["layers.1.mlp.down"], "activation", 8):
        now = {n: (m.weight_quantizer, m.input_quantizer) for n, m in net.named_modules() if hasattr(m, "weight_quantizer")}
        changed = [n for n in before if now[n][1] is not before[n][1]]
        assert changed == ["layers.1.mlp.down"] and all(now[n][0] is before[n][0] for n in before)
        assert now["layers.1.mlp.down"][1].cfg == QuantizerConfig(bits=8)  # the layer's own method, at 8 bits
    after = {n: (m.weight_quantizer, m.input_quantizer) for n, m in net.named_modules() if hasattr(m, "weight_quantizer")}
    assert all(after[n][0] is before[n][0] and after[n][1] is before[n][1] for n in before)


def test_measure_rows_and_outputs(net, batches, tmp_path):
    targets = sens.sensitivity_targets(net, "type")
    assert sens.probe_count(net, targets, [2, 3, 8], "both") == 10  # the 3-bit column costs nothing
    rows = sens.measure(net, batches, targets, [2, 3, 8], "both", "cpu")
    assert len(rows) == 15 and set(rows[0]) == set(SENSITIVITY_COLUMNS)
    assert all(r["delta"] == 0 for r in rows if r["bits"] == 3)
    assert all(r["delta"] != 0 for r in rows if r["bits"] == 2)  # 2-bit rounding moves the loss
    assert {r["params"] for r in rows if r["match"] == "layers.*.mlp.down"} == {2 * 384 * 128}
    text = sens.csv_text(rows)
    assert list(csv.DictReader(text.splitlines()))[0]["match"] == "layers.*.attn.qkv"
    sens.write_heatmap(rows, [2, 3, 8], tmp_path / "h.png", "test")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layers.*.mlp.down" in sens.table_text(rows, [2, 3, 8])


def test_a_16_bit_model_is_probed_with_its_own_method(batches):
    torch.manual_seed(0)
    model = Llama(llama_config("debug-xs", vocab_size=64, max_seq_len=32))
    plain = QuantizerConfig(bits=16, rotation="none")
    quantize_model(model, plain, plain)  # what quant=bf16 builds
    targets = sens.sensitivity_targets(model.eval(), "layer")
    rows = sens.measure(model, batches, {"layers.0.mlp.down": targets["layers.0.mlp.down"]}, [4, 16], "weight", "cpu")
    assert [r["bits"] for r in rows] == [4, 16] and rows[1]["delta"] == 0 and rows[0]["delta"] != 0
    with sens.probing(model, ["layers.0.mlp.down"], "weight", 4):
        assert model.layers[0].mlp.down.weight_quantizer.cfg == QuantizerConfig(bits=4, rotation="none")


def test_cli_rejects_bad_input_before_loading(tmp_path, capsys):
    assert sens.main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "s.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sens.main(["--ckpt", "x", "--out", "y", "--bits", "9"]) == 2
    assert "bits=9 is not allowed" in capsys.readouterr().err


@pytest.mark.slow
def test_sensitivity_then_allocation_then_training(tmp_path, capsys):
    run_train(tmp_path / "w3a3", "quant.bits=3", "trainer.max_steps=6")
    ckpt = tmp_path / "w3a3" / "checkpoints" / "last.ckpt"
    out = tmp_path / "sens.csv"
    assert sens.main(["--ckpt", str(ckpt), "--bits", "2", "3", "4", "--batches", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cost: (1 + 20 probes) x 1 batches = 21 forward passes" in printed
    assert out.is_file() and out.with_suffix(".png").is_file() and len(out.read_text().splitlines()) == 31
    rules = tmp_path / "rules.yaml"
    assert script("allocate_bits").main(["--sensitivity", str(out), "--budget-bits-per-param", "3.0", "--out", str(rules)]) == 0
    printed = capsys.readouterr().out
    assert "predicted loss increase" in printed and "bits/param (budget 3)" in printed
    run_train(tmp_path / "alloc", "quant.bits=3", f"quant.rules={rules.read_text().strip()}", "trainer.max_steps=2")
    r = json.loads((tmp_path / "alloc" / "results.json").read_text())
    chosen = {rule["match"]: rule["weight"]["bits"] for rule in r["quantization"]["rules"]}
    assert {n: c["weight"]["bits"] for n, c in r["quantization"]["layers"].items()} == chosen
    assert r["status"] == "completed" and r["w_bits"] <= 3.0 and r["a_bits"] == 3.0
