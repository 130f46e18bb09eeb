"""Results table: precision keys of the QuEST table, collecting results.json, the runs CSV."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from qat.scaling.precision import storage_bits
from qat.scaling.results import (
    RESULT_COLUMNS,
    collect_results,
    load_quest_runs,
    load_runs,
    quest_precision,
    read_results_csv,
    runs_from_rows,
    write_results_csv,
)

REPO = Path(__file__).resolve().parents[1]
QUEST_TABLE = REPO.parent / "shared" / "data" / "quest_runs_for_scaling.json"
needs_quest = pytest.mark.skipif(not QUEST_TABLE.exists(), reason=f"published QuEST run table not found at {QUEST_TABLE}")


# --- precision keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w_quant, a_quant, w_bits, a_bits, key",
    [
        ("NoQuantizer", "NoQuantizer", 16, 16, "bf16"),
        ("HalfHadamardTrustQuantizer", "NoQuantizer", 3, 16, "w3a16"),
        ("HalfHadamardFP4TrustQuantizer", "NoQuantizer", 4, 16, "w4a16"),  # weight-only rule comes first
        ("HalfHadamardFP4TrustQuantizer", "HalfHadamardFP4TrustQuantizer", 16, 16, "fp4"),
        ("HadamardFourEightTrustQuantizer", "HadamardTrustQuantizer", 4, 4, "2:4"),
        ("HadamardClipQuantizer", "HadamardClipQuantizer", 1, 1, "w1a1"),
        ("HalfHadamardTrustQuantizer", "HalfHadamardTrustQuantizer", 8.0, 8.0, "w8a8"),
        ("HadamardTrustQuantizer", "HadamardTrustQuantizer", 1.58, 1.58, "w1.58a1.58"),
        ("TrustQuantizer", "TrustQuantizer", 8, 8, "w8a8-nohad"),
        ("ClipQuantizer", "ClipQuantizer", 1, 1, "w1a1-nohad"),
    ],
)
def test_quest_precision_rules(w_quant, a_quant, w_bits, a_bits, key):
    assert quest_precision(w_quant, a_quant, w_bits, a_bits) == key


def test_quest_precision_unknown_pair():
    with pytest.raises(ValueError, match=r"\('LSQQuantizer', 'LSQQuantizer'\) has no precision rule"):
        quest_precision("LSQQuantizer", "LSQQuantizer", 4, 4)


@pytest.mark.parametrize("w_bits, sparse, bits", [(16, False, 16), (4, False, 4), (4, True, 2.5), (3, False, 3), (1.58, False, 1.58), (8, True, 4.5)])
def test_storage_bits(w_bits, sparse, bits):
    assert storage_bits(w_bits, sparse) == bits


@needs_quest
def test_quest_runs_carry_memory_bits_from_their_fields(shared_dir):
    runs = load_quest_runs(shared_dir / "data" / "quest_runs_for_scaling.json")
    by_key = {r.precision: r.memory_bits for r in runs}
    assert by_key["bf16"] == 16 and by_key["fp4"] == 4 and by_key["2:4"] == 2.5 and by_key["w4a16"] == 4 and by_key["w1a1"] == 1


@needs_quest
def test_quest_table_counts():
    runs = load_quest_runs(QUEST_TABLE)
    keys = Counter(r.precision for r in runs)
    family = Counter(
        "bf16" if k == "bf16" else "weight-only" if k.endswith("a16") else "nohad" if k.endswith("-nohad") else k if k in ("fp4", "2:4") else "quest"
        for k in (r.precision for r in runs)
    )
    # Reference section 4.1: 6 bf16, 16 weight-only, 4 fp4, 6 2:4, 24 no-Hadamard, 48 QuEST.
    assert family == {"bf16": 6, "weight-only": 16, "fp4": 4, "2:4": 6, "nohad": 24, "quest": 48}
    assert {k: keys[k] for k in ("w1a1", "w2a2", "w3a3", "w4a4", "w8a8")} == {"w1a1": 6, "w2a2": 12, "w3a3": 13, "w4a4": 14, "w8a8": 3}
    fp4 = [r for r in runs if r.precision == "fp4"]
    assert all((r.w_bits, r.a_bits) == (4, 4) for r in fp4)  # the table says 16
    assert {r.size_label for r in runs} == {"30M", "50M", "100M", "200M", "430M", "800M"}
    bf16_30m = next(r for r in runs if r.precision == "bf16" and r.size_label == "30M")
    assert bf16_30m.loss == pytest.approx(3.2071, abs=1e-4) and bf16_30m.N == 30_482_560


def test_quest_table_errors(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"tokens": 1}]))
    with pytest.raises(ValueError, match="run 0 is missing field 'non_embedding_parameters'"):
        load_quest_runs(tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list of runs"):
        load_quest_runs(tmp_path / "dict.json")


# --- collecting results.json -------------------------------------------------------------------


def result(precision="w4a4", status="completed", val_loss=3.1, tokens=1000, seed=0, model="debug", **extra):
    base = {
        "status": status, "val_loss": val_loss, "val_ppl": 22.2, "tokens": tokens, "non_embedding_params": 10,
        "total_params": 20, "model": model, "w_bits": 4.0, "a_bits": 4.0, "quant_preset": "quest",
        "precision": precision, "wall_time_s": 1.5, "step": 7, "seed": seed, "run_dir": "ignored",
        "overrides": ["quant=quest"], "loss_floor": None, "unigram_loss": 7.5,
    }  # fmt: skip
    return {**base, **extra}


def write(path: Path, content, mtime: float | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(content if isinstance(content, str) else json.dumps(content))
    if mtime is not None:
        os.utime(path / "results.json", (mtime, mtime))


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "outputs"
    write(root / "a" / "done", result())
    write(root / "a" / "failed", result(status="failed", precision="w2a2", val_loss=9.0))
    write(root / "a" / "running", result(status="running", precision="w3a3", val_loss=None))
    write(root / "b" / "corrupt", "{not json")
    write(root / "b" / "no_precision", {k: v for k, v in result().items() if k != "precision"})
    write(root / "b" / "completed_no_loss", result(precision="w8a8", val_loss=None))
    # Reruns of one configuration: the newest completed run wins.
    write(root / "c" / "old", result(precision="bf16", val_loss=3.0), mtime=1_000)
    write(root / "c" / "new", result(precision="bf16", val_loss=2.9), mtime=2_000)
    write(root / "d" / "done_old", result(precision="fp4", val_loss=3.2), mtime=1_000)
    write(root / "d" / "failed_new", result(precision="fp4", status="failed", val_loss=None), mtime=2_000)
    (root / "e" / "no_results_yet").mkdir(parents=True)
    return root


def test_collect_handles_bad_failed_and_duplicate_runs(tree):
    warnings: list[str] = []
    rows = collect_results([tree, tree / "a", tree / "missing_root"], warn=warnings.append)  # overlapping roots
    by_dir = {Path(r["run_dir"]).relative_to(tree.resolve()).as_posix(): r for r in rows}
    assert sorted(by_dir) == ["a/done", "a/failed", "a/running", "c/new", "d/done_old"]
    assert by_dir["a/failed"]["status"] == "failed" and by_dir["a/running"]["val_loss"] is None
    assert by_dir["c/new"]["val_loss"] == 2.9
    text = "\n".join(warnings)
    assert len(warnings) == 6, text
    assert "missing_root does not exist" in text
    assert "corrupt/results.json: unreadable" in text
    assert "precision=None must be a non-empty string" in text
    assert "completed run has val_loss=None" in text
    assert "keeping " + str(tree.resolve() / "c" / "new") in text and "dropping " + str(tree.resolve() / "c" / "old") in text
    assert "keeping " + str(tree.resolve() / "d" / "done_old") in text


def test_csv_columns_and_round_trip(tree, tmp_path):
    rows = collect_results([tree], warn=lambda msg: None)
    out = tmp_path / "tables" / "runs.csv"
    write_results_csv(rows, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["runs.csv"]  # no temp file left behind
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        first = next(reader)
    assert first["tokens"] == "1000" and first["w_bits"] == "4.0" and json.loads(first["overrides"]) == ["quant=quest"]
    back = read_results_csv(out)
    assert [r["run_dir"] for r in back] == [r["run_dir"] for r in rows]
    runs = runs_from_rows(back)  # completed only by default
    assert sorted(r.precision for r in runs) == ["bf16", "fp4", "w4a4"]
    w4a4 = next(r for r in runs if r.precision == "w4a4")
    assert (w4a4.N, w4a4.D, w4a4.loss, w4a4.w_bits, w4a4.size_label) == (10, 1000, 3.1, 4.0, "debug")
    warnings: list[str] = []
    with_incomplete = runs_from_rows(back, include_incomplete=True, warn=warnings.append)
    assert sorted(r.precision for r in with_incomplete) == ["bf16", "fp4", "w2a2", "w4a4"]
    assert len(warnings) == 1 and "running run without val_loss; skipped" in warnings[0]


def test_runs_csv_errors_name_row_and_field(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("status,precision,model,non_embedding_params,tokens,val_loss\ncompleted,bf16,m,10,100,3.0\ncompleted,bf16,m,10,1e3x,3.0\n")
    with pytest.raises(ValueError, match=r"runs.csv row 2: field 'tokens'='1e3x' is not a number"):
        load_runs(path)
    path.write_text("status,precision,model,tokens,val_loss\n")
    with pytest.raises(ValueError, match="has no column 'non_embedding_params'"):
        load_runs(path)
    path.write_text("")
    with pytest.raises(ValueError, match="runs.csv is empty"):
        load_runs(path)
    path.write_text("status,precision,model,non_embedding_params,tokens,val_loss\ndone,bf16,m,10,100,3.0\n")
    with pytest.raises(ValueError, match="row 1: status='done'"):
        load_runs(path)


def test_load_runs_formats(tree, tmp_path):
    assert sorted(r.precision for r in load_runs(tree, warn=lambda m: None)) == ["bf16", "fp4", "w4a4"]
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_runs(tmp_path / "runs.txt")
    with pytest.raises(ValueError, match="format='parquet' is not allowed"):
        load_runs(tree, fmt="parquet")
    if QUEST_TABLE.exists():
        assert len(load_runs(QUEST_TABLE)) == 104


# --- collect_results.py --------------------------------------------------------------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_cli_with_nothing_to_collect(tmp_path, capsys):
    assert load_script("collect_results.py").main([str(tmp_path), "--out", str(tmp_path / "runs.csv")]) == 2
    assert "no readable results.json" in capsys.readouterr().err
    assert not (tmp_path / "runs.csv").exists()


@pytest.mark.slow
def test_collect_cli(tree, tmp_path):
    out = tmp_path / "runs.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "scripts" / "collect_results.py"), str(tree), str(tree / "a"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 5 runs (3 completed, 1 failed, 1 running) to {out}"
    assert proc.stderr.count("warning: ") == 5  # corrupt, no precision, no loss, 2 reruns
    assert len(read_results_csv(out)) == 5
