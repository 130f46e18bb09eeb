"""scripts/compare_torchao.py end to end on a tiny Hugging Face Llama (hidden 64, intermediate
96: group 32 divides both; full Hadamard is 64 = 2^6 and 96 = 12 * 8): every arm trains two
steps, converts to its framework's real low-bit form and is evaluated; the conversions keep
the fake-quant quality; without torchao only our arms run; bad input is one line, exit 2."""

import csv
import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow

ARGS = ["--steps", "2", "--lr", "1e-3", "--seq-len", "32", "--batch-size", "2", "--val-batches", "1"]
WORDS = "the farm cow sheep barn field grows corn wheat rain sun tractor milk eggs hen".split()


def script():
    if "compare_torchao" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("compare_torchao", ROOT / "scripts" / "compare_torchao.py")
        sys.modules["compare_torchao"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["compare_torchao"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(a save_pretrained Llama directory, a text corpus): built here, nothing downloaded."""
    pytest.importorskip("transformers")
    from test_hf import save_hf_llama

    root = tmp_path_factory.mktemp("compare")
    save_hf_llama(root / "hf", "gqa_sharded")
    import random

    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(300)) + "\n")
    return root / "hf", corpus


def read_rows(path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# peak_mib = ")  # the header says how memory was measured
    return list(csv.DictReader(lines[1:]))


def test_every_arm_trains_converts_and_evaluates(inputs, tmp_path):
    pytest.importorskip("torchao")
    model, corpus = inputs
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_torchao.py"), "--model", str(model), "--data", str(corpus), *ARGS, "--out", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = {r["arm"]: r for r in read_rows(tmp_path / "out" / "compare_torchao.csv")}
    compare = script()
    assert list(rows) == list(compare.ARMS)
    for name, r in rows.items():
        before, after = float(r["ppl_before"]), float(r["ppl_after"])
        kl_before, kl_after = float(r["kl_before"]), float(r["kl_after"])
        assert math.isfinite(before) and math.isfinite(after) and kl_before >= 0 and 0 <= float(r["top1_after"]) <= 100, name
        assert r["loss"] == ("kd" if name.endswith("-kd") else "ce"), name
        if r["loss"] == "kd":  # the teacher (the random model itself), not the corpus, is learned
            assert after > float(rows[name.removesuffix("-kd")]["ppl_after"]), name
        else:  # two steps at lr 1e-3 on a random model: the corpus is learned
            assert after < before, name
        assert float(r["seconds_per_step"]) > 0 and float(r["peak_mib"]) > 0 and r["steps"] == "2"
        if name == "unquantized":
            assert r["ppl_converted"] == "" and r["ratio_to_unquantized"] == "1.000000" and kl_before == 0.0
            continue
        # Each framework's conversion computes what its fake quantization trained: torchao's
        # exactly, ours through the integer forward (float summation order differs).
        assert abs(float(r["ppl_converted"]) - after) <= 1e-3 * after, name
        assert 0 < float(r["converted_mib"]) < float(r["peak_mib"])
    assert (tmp_path / "out" / "compare_torchao.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = proc.stdout[proc.stdout.index("| arm |") :]
    assert all(f"| {name} |" in table for name in compare.ARMS)
    assert "torchao " in proc.stdout and "USDT" not in proc.stderr


def test_without_torchao_our_arms_run_and_theirs_are_refused(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # any `import torchao` now fails
    model, corpus = inputs
    compare = script()
    base = ["--model", str(model), "--data", str(corpus), *ARGS]
    assert compare.main([*base, "--out", str(tmp_path / "theirs")]) == 2  # the default arms include torchao's
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: torchao arms need torchao>=0.14") and err.endswith('pip install -e ".[torchao]"') and "\n" not in err
    assert not (tmp_path / "theirs").exists()

    assert compare.main([*base, "--arms", "unquantized,ours-w4a4-had", "--out", str(tmp_path / "ours")]) == 0
    rows = read_rows(tmp_path / "ours" / "compare_torchao.csv")
    assert [r["arm"] for r in rows] == ["unquantized", "ours-w4a4-had"]
    assert math.isfinite(float(rows[1]["ppl_converted"])) and math.isfinite(float(rows[1]["ratio_to_unquantized"]))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--arms": "ours-w4a4,unquantized"}, "--arms: 'ours-w4a4' is not an arm; choose from unquantized, ao-w4a16-g32"),
        ({"--steps": "1"}, "--steps=1 must be >= 2 (the first step is not timed)"),
        ({"--lr": "nan"}, "--lr=nan must be a finite number > 0"),
        ({"--seq-len": "65"}, "--seq-len=65 exceeds the checkpoint's max_position_embeddings=64"),
        ({"--data": "missing.txt"}, "--data='missing.txt' does not exist"),
        ({"--model": "."}, "--model='.' is not a save_pretrained directory (no config.json)"),
        ({"--val-batches": "50"}, "--val-batches=50 needs"),
        ({"--seed": "-1"}, "--seed=-1 must be >= 0"),
    ],
)
def test_bad_input_is_one_line_before_training(inputs, tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(tmp_path)
    model, corpus = inputs
    args = {"--model": str(model), "--data": str(corpus), "--steps": "2", "--seq-len": "32", "--batch-size": "2", "--arms": "ours-w4a16-g32"}
    args.update(change)
    assert script().main([*(x for kv in args.items() for x in kv), "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_memory_peak_is_the_running_sum_of_allocations_and_frees():
    from qat.inference.compare import memory_profile, profiled_peak_bytes, warmup_cosine

    with memory_profile() as prof:
        a = torch.empty(2**20, dtype=torch.uint8)
        del a  # freed before the next: the peak is 3 + 1 MiB, not 1 + 3 + 1
        b = torch.empty(3 * 2**20, dtype=torch.uint8)
        c = torch.empty(2**20, dtype=torch.uint8)
        del b, c
    assert profiled_peak_bytes(prof) == 4 * 2**20
    lrs = [warmup_cosine(s, 10, 2) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] == pytest.approx(0.1) and lrs[2:] == sorted(lrs[2:], reverse=True)
