"""scripts/bench_inference.py on a tiny Hugging Face Llama: every row runs, the table lands
between the document's markers and nothing else in the document changes."""

import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")


def test_every_row_runs_and_the_doc_block_is_replaced(tmp_path):
    from test_hf import save_hf_llama

    save_hf_llama(tmp_path / "hf", "gqa_sharded")
    doc = tmp_path / "bench.md"
    doc.write_text("# before\n<!-- bench_inference:begin -->\nold\n<!-- bench_inference:end -->\nafter\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_inference.py"), "--model", str(tmp_path / "hf"), "--tokens", "3", "--prefill", "16", "--update-doc", str(doc)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("# before\n<!-- bench_inference:begin -->\n") and text.endswith("<!-- bench_inference:end -->\nafter\n") and "old" not in text
    for row in ("transformers fp32 (reference)", "ours, unquantized import", "fake-quant W4A4", "fake-quant W4A16", "packed W4A4", "packed W4A16", "packed W2A16", "packed W4A16, bfloat16 model"):
        assert f"| {row}" in text, row
    bad = subprocess.run([*cmd[:2], "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --model=") and bad.stderr.count("\n") == 1
