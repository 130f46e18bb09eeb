"""Bad inputs to every script that reads files or directories: missing paths, random bytes
under every extension we read, and files of the wrong kind (a GGUF where a checkpoint is
expected, a packed export where a training checkpoint is, a checkpoint where a packed export
is, a corpus that is empty, has one document or is smaller than one batch, a checkpoint whose
corpus has gone). Each must exit with code 2 and print exactly one `error:` line naming the bad
value, before any expensive work, and leave nothing written. A traceback is a failure.

Scripts are called in-process through their main(argv) (conftest.refused); train.py and
fault_drill.py (which runs train.py) as a user runs them, in a subprocess (slow). The bench_*
scripts other than bench_inference read no files. The inputs are built here, tiny: a debug-xs
checkpoint of random weights, its packed and Hugging Face exports, a GGUF header, corpora.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, refused

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only add contention

WORDS = "the farm cow sheep barn field grows corn wheat rain sun tractor milk eggs hen".split()
NOISE = ("gguf", "ckpt", "safetensors", "json", "jsonl", "csv", "txt")  # random bytes under each name
DATA = ["data.seq_len=32", "data.batch_size=2", "data.val_batches=1", "data.source.val_fraction=0.1"]


def make_checkpoint(path: Path, *overrides: str) -> Path:
    """A debug-xs checkpoint of random weights, as write_model_checkpoint writes one for ptq.py."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from qat.train.checkpoint import write_model_checkpoint
    from qat.train.lifecycle import build_net

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=["model=debug-xs", *overrides]), resolve=True)
    torch.manual_seed(0)
    net = build_net(cfg, instantiate(OmegaConf.create(cfg["tokenizer"])).vocab_size)
    return write_model_checkpoint(path, net, cfg, step=1)


def write_gguf(path: Path) -> None:
    """A well-formed GGUF of the llama architecture that is no model: one tensor, no tokenizer."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input the cases name, in one directory (IN/ in their arguments)."""
    from qat.hf.export import export_hf
    from qat.packed.export import export_checkpoint

    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    docs = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30))}) + "\n" for _ in range(200)]
    (root / "corpus.jsonl").write_text("".join(docs))
    (root / "one.jsonl").write_text(docs[0])
    (root / "empty.jsonl").write_text("")
    (root / "tiny.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(4)))  # 18 train tokens
    noise = random.Random(1).randbytes(4096)
    for ext in NOISE:
        (root / f"noise.{ext}").write_bytes(noise)
    (root / "list.json").write_text("[1, 2, 3]\n")
    (root / "notes.txt").write_text("plain text,\nnot JSON\n")
    corpus = ["data=local", f"data.path={root / 'corpus.jsonl'}", *DATA]
    make_checkpoint(root / "model.ckpt", "quant=gguf_q4_0", *corpus)  # W4A16: every exporter takes it
    make_checkpoint(root / "bf16.ckpt", "quant=bf16", *corpus)
    (root / "gone.jsonl").write_text((root / "corpus.jsonl").read_text())
    make_checkpoint(root / "gone.ckpt", "data=local", f"data.path={root / 'gone.jsonl'}", *DATA)
    (root / "gone.jsonl").unlink()  # a checkpoint whose corpus has moved
    make_checkpoint(root / "onedoc.ckpt", "data=local", f"data.path={root / 'one.jsonl'}", *DATA)
    torch.save({"global_step": 0, "state_dict": {}}, root / "bare.ckpt")  # a Lightning checkpoint, not train.py's
    export_checkpoint(root / "model.ckpt", root / "packed")
    export_hf(root / "model.ckpt", root / "hf")  # context 32 (the run's data.seq_len), byte tokenizer
    if importlib.util.find_spec("gguf") is not None:
        write_gguf(root / "model.gguf")
    else:
        (root / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(32))
    for dirname, text in (("runs/a", noise), ("wrongruns/a", json.dumps({"status": "completed", "precision": "bf16"}).encode())):
        (root / dirname).mkdir(parents=True)
        (root / dirname / "results.json").write_bytes(text)  # corrupt; a result of no train.py run
    # Third-party import noise (torchao warns about its own CUDA libraries when compressed_tensors
    # imports it) happens here, once, not inside a case's captured stderr.
    if importlib.util.find_spec("compressed_tensors") is not None:
        importlib.import_module("compressed_tensors")
    return root


_MAINS: dict = {}


def script_main(name: str):
    """scripts/<name>.py's main(), loaded once (registered first: dataclasses look their module up)."""
    if name not in _MAINS:
        spec = importlib.util.spec_from_file_location(f"fuzz_{name}", ROOT / "scripts" / f"{name}.py")
        sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MAINS[name] = module.main
    return _MAINS[name]


def case(script: str, *argv: str, says: str, slow: bool = False, needs: tuple[str, ...] = ()):
    """One bad input: the script, its arguments (IN/ = the inputs, OUT/ = an empty directory
    the case may not write into), what its one error line must contain, and the optional
    packages the script asks for before it reads this input."""
    marks = [pytest.mark.slow] if slow else []
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        marks.append(pytest.mark.skip(reason=f"{missing[0]} is not installed"))
    return pytest.param(script, list(argv), says, id=f"{script}: {' '.join(a.replace('IN/', '').replace('OUT/', '') for a in argv)}"[:120], marks=marks)


# Every way a --ckpt can be no train.py checkpoint, and what the line says.
NOT_A_CHECKPOINT = [
    ("missing.ckpt", "missing.ckpt' does not exist"),
    ("noise.ckpt", "noise.ckpt' is unreadable"),
    ("model.gguf", "model.gguf' is unreadable"),  # a GGUF where a checkpoint is expected
    ("packed", "packed' is a model directory"),  # a packed export where a checkpoint is expected
    ("hf", "hf' is a model directory"),
    ("bare.ckpt", "bare.ckpt' was not written by train.py"),
    ("hf/model.safetensors", "model.safetensors' is not a Lightning checkpoint"),
]
# A bad --model where a packed export (scripts/export.py) is expected.
NOT_A_PACKED_EXPORT = [
    ("missing", "missing' is not a packed model directory"),
    ("model.ckpt", "model.ckpt' is not a packed model directory"),  # a checkpoint where an export is expected
    ("model.gguf", "model.gguf' is not a packed model directory"),
    ("hf", "hf' is a Hugging Face model directory, not a packed export"),
]
# A bad --model where a save_pretrained directory is expected.
NOT_A_HF_DIR = [
    ("missing", "missing' is not a save_pretrained directory"),
    ("model.gguf", "model.gguf' is not a save_pretrained directory"),
    ("noise.json", "noise.json' is not a save_pretrained directory"),
    ("packed", "packed/config.json: config.json model_type=None is not supported"),
]
# A bad data=local corpus, and what the line says.
BAD_CORPUS = [
    ("missing.jsonl", "missing.jsonl' does not exist"),
    ("empty.jsonl", "empty corpus"),
    ("one.jsonl", "one.jsonl' has 1 documents; need at least 2"),
    ("noise.jsonl", "noise.jsonl' is not UTF-8"),
]

CASES = [
    # ---- checkpoints in, something else out
    *(case(s, "--ckpt", f"IN/{bad}", "--out", "OUT/x", says=says)
      for s in ("export", "export_hf") for bad, says in NOT_A_CHECKPOINT),
    *(case("export_compressed", "--ckpt", f"IN/{bad}", "--out", "OUT/x", says=says, needs=("compressed_tensors",)) for bad, says in NOT_A_CHECKPOINT),
    *(case("export_gguf", "--ckpt", f"IN/{bad}", "--out", "OUT/x.gguf", says=bad, needs=("gguf",)) for bad, _ in NOT_A_CHECKPOINT),
    *(case("export_gguf", "--ckpt", "IN/model.ckpt", "--out", "OUT/x.gguf", "--tokenizer-gguf", f"IN/{bad}", says=says, needs=("gguf",)) for bad, says in (
        ("noise.gguf", "noise.gguf' is not a GGUF file"), ("model.ckpt", "model.ckpt' is not a GGUF file"), ("model.gguf", "model.gguf' holds no tokenizer"))),
    *(case(s, "--ckpt", f"IN/{bad}", says=says) for s in ("generate", "evaluate") for bad, says in NOT_A_CHECKPOINT),
    *(case(s, "--model", f"IN/{bad}", says=says) for s in ("generate", "evaluate") for bad, says in NOT_A_PACKED_EXPORT),
    case("evaluate", "--ckpt", "IN/gone.ckpt", says="gone.jsonl' does not exist"),
    case("evaluate", "--ckpt", "IN/onedoc.ckpt", says="one.jsonl' has 1 documents"),
    *(case("evaluate", "--ckpt", "IN/model.ckpt", "data=local", f"data.path=IN/{bad}", says=says, slow=bad != "one.jsonl") for bad, says in BAD_CORPUS),
    case("evaluate", "--ckpt", "IN/model.ckpt", "data=nope", says="Could not find 'data/nope'"),
    case("evaluate", "--ckpt", "IN/model.ckpt", "--no-loss", "--hellaswag", "IN/noise.jsonl", says="noise.jsonl' is not UTF-8"),
    case("evaluate", "--ckpt", "IN/model.ckpt", "--no-loss", "--hellaswag", "IN/missing.jsonl", says="missing.jsonl' does not exist"),
    case("evaluate", "--ckpt", "IN/model.ckpt", "--no-loss", "--hellaswag", "IN/corpus.jsonl", says="example 0 needs keys ctx"),  # a corpus, not a test
    case("evaluate", "--ckpt", "IN/model.ckpt", "--no-loss", "--hellaswag", "IN/notes.txt", says="notes.txt' line 1 is not JSON"),
    case("evaluate", "--ckpt", "IN/model.ckpt", "--reference", "IN/noise.ckpt", says="noise.ckpt' is unreadable"),
    case("evaluate", "--ckpt", "IN/model.ckpt", "--reference", "IN/model.gguf", says="model.gguf' is unreadable"),
    case("evaluate", "--ckpt", "IN/model.ckpt", "--reference", "IN/missing", says="missing' does not exist"),
    case("evaluate", "--ckpt", "IN/model.ckpt", "--out", "IN/packed", says="packed' is a directory"),
    *(case(s, "--ckpt", f"IN/{bad}", "--out", "OUT/x", says=bad) for s in ("layer_sensitivity", "grad_alignment") for bad, _ in NOT_A_CHECKPOINT),
    *(case(s, "--ckpt", f"IN/{bad}", "--out", "OUT/x", says=says)
      for s in ("layer_sensitivity", "grad_alignment") for bad, says in (("gone.ckpt", "gone.jsonl' does not exist"), ("onedoc.ckpt", "one.jsonl' has 1 documents"))),
    # ---- post-training quantization: a model or checkpoint, and the calibration corpus
    *(case("ptq", "--model", f"IN/{bad}", "--method", "rtn", "--out", "OUT/x.ckpt", says=says) for bad, says in NOT_A_HF_DIR),
    *(case("ptq", "--ckpt", f"IN/{bad}", "--method", "rtn", "--out", "OUT/x.ckpt", says=bad) for bad, _ in NOT_A_CHECKPOINT),
    *(case("ptq", "--ckpt", "IN/model.ckpt", "--method", "gptq", "--out", "OUT/x.ckpt", "data=local", f"data.path=IN/{bad}", says=says) for bad, says in BAD_CORPUS),
    case("ptq", "--ckpt", "IN/model.ckpt", "--method", "gptq", "--out", "OUT/x.ckpt", "data=local", "data.path=IN/tiny.jsonl", "data.batch_size=16",
         says="data.batch_size=16 needs 2049 train tokens, the train split has 18"),  # data=local: the default data.seq_len=128
    case("ptq", "--ckpt", "IN/gone.ckpt", "--method", "gptq", "--out", "OUT/x.ckpt", says="gone.jsonl' does not exist"),
    case("ptq", "--ckpt", "IN/onedoc.ckpt", "--method", "gptq", "--out", "OUT/x.ckpt", says="one.jsonl' has 1 documents"),
    case("ptq", "--model", "IN/hf", "--method", "gptq", "--out", "OUT/x.ckpt", "data=local", "data.path=IN/one.jsonl", "data.seq_len=16",
         says="one.jsonl' has 1 documents"),
    case("ptq", "--ckpt", "IN/model.ckpt", "--method", "rtn", "--out", "IN/packed", says="packed' is a directory"),
    case("ptq", "--ckpt", "IN/model.ckpt", "--method", "rtn", "--out", "OUT/x.ckpt", "data=nope", says="Could not find 'data/nope'"),
    # ---- GGUF in
    *(case("import_gguf", f"IN/{bad}", "--out", "OUT/x", says=says) for bad, says in (
        ("missing.gguf", "missing.gguf' does not exist"), ("noise.gguf", "noise.gguf' is not a GGUF file"),
        ("model.ckpt", "model.ckpt' is not a GGUF file"), ("packed", "packed' does not exist"))),
    case("import_gguf", "IN/model.gguf", "--out", "OUT/x", says="model.gguf': tensor", needs=("gguf", "transformers", "accelerate")),
    # ---- studies: checkpoints, a Hugging Face model and a corpus
    *(case("gguf_study", "--baseline-ckpt", f"IN/{bad}", "--qat-ckpt", "IN/model.ckpt", "--out", "OUT/s", says=bad, needs=("gguf",)) for bad, _ in NOT_A_CHECKPOINT),
    case("gguf_study", "--baseline-ckpt", "IN/model.ckpt", "--qat-ckpt", "IN/model.ckpt", "--out", "OUT/s", says="model.ckpt' has 4-bit weights; this arm needs 16-bit",
         needs=("gguf",)),
    case("gguf_study", "--baseline-ckpt", "IN/bf16.ckpt", "--qat-ckpt", "IN/gone.ckpt", "--out", "OUT/s", says="gone.jsonl' does not exist", needs=("gguf",)),
    case("gguf_study", "--baseline-ckpt", "IN/bf16.ckpt", "--qat-ckpt", "IN/model.ckpt", "--out", "OUT/s", "--tokenizer-gguf", "IN/noise.gguf",
         says="noise.gguf' is not a GGUF file", needs=("gguf", "llama_cpp")),  # refused after the study directory is made: it goes again
    *(case("bench_lora", "--model", f"IN/{bad}", "--data", "IN/corpus.jsonl", "--out", "OUT/b", "--seq-len", "16", "--ranks", "4", says=says) for bad, says in NOT_A_HF_DIR),
    *(case("bench_lora", "--model", "IN/hf", "--data", f"IN/{bad}", "--out", "OUT/b", "--seq-len", "16", "--ranks", "4", says=says) for bad, says in BAD_CORPUS),
    *(case("bench_lora", "--model", "IN/hf", "--data", "IN/corpus.jsonl", "--out", "OUT/b", *argv, says=says) for argv, says in (
        (["--ranks", "0"], "--ranks 0 is not allowed"), (["--batch-sizes", "2", "2"], "--batch-sizes 2 2 repeats a value"),
        (["--steps", "2"], "--steps 2 is too few"), (["--quant", "nope"], "Could not find 'quant/nope'"),
        (["--ranks", "5000", "--seq-len", "16"], "lora.rank=5000 is larger than min(in, out)"))),
    *(case("bench_scale_fit", "--model", f"IN/{bad}", "--out", "OUT/f", says=f"{bad}' is not a save_pretrained directory") for bad in ("missing", "model.gguf", "noise.json")),
    *(case("bench_scale_fit", "--model", "IN/hf", "--out", "OUT/f", *argv, says=says) for argv, says in (
        (["--arms", "absmax:often"], "--arms 'absmax:often' is not allowed"), (["--arms", "lsq:refit"], "--arms 'lsq:refit' is not allowed"),
        (["--arms", "absmax:refit", "absmax:refit"], "repeats an arm"), (["--rounds", "0"], "--rounds 0 is not allowed"),
        (["--step-seconds", "0"], "--step-seconds 0.0 is not allowed"), (["--quant", "nope"], "Could not find 'quant/nope'"),
        (["--quant", "bf16"], "--quant bf16 quantizes no weight"),
        (["--quant", "gguf_q4_1", "--arms", "absmax:frozen"], "scale_update='frozen' is not allowed with asymmetric=true"))),
    *(case("compare_torchao", "--model", f"IN/{bad}", "--data", "IN/corpus.jsonl", "--out", "OUT/c", "--seq-len", "16", "--arms", "unquantized", says=says)
      for bad, says in NOT_A_HF_DIR if bad != "packed"),
    case("compare_torchao", "--model", "IN/packed", "--data", "IN/corpus.jsonl", "--out", "OUT/c", "--seq-len", "16", "--arms", "unquantized", says="packed/tokenizer.json' does not exist"),
    *(case("compare_torchao", "--model", "IN/hf", "--data", f"IN/{bad}", "--out", "OUT/c", "--seq-len", "16", "--arms", "unquantized", says=says, slow=bad != "one.jsonl")
      for bad, says in BAD_CORPUS),
    case("compare_torchao", "--model", "IN/hf", "--data", "IN/tiny.jsonl", "--out", "OUT/c", "--seq-len", "16", "--arms", "unquantized", says="--batch-size=8 needs 129 train tokens", slow=True),
    *(case("real_model_study", "--model", f"IN/{bad}", "--data", "IN/corpus.jsonl", "--out", "OUT/r", says=f"{bad}' must be a save_pretrained directory")
      for bad in ("missing", "model.gguf", "noise.json")),
    case("real_model_study", "--model", "IN/packed", "--data", "IN/corpus.jsonl", "--out", "OUT/r", says="packed/config.json: config.json model_type=None"),
    *(case("real_model_study", "--model", "IN/hf", "--data", f"IN/{bad}", "--out", "OUT/r", "--seq-len", "16", "--batch-size", "2", says=says,
           slow=bad in ("empty.jsonl", "noise.jsonl")) for bad, says in (("missing.jsonl", "missing.jsonl' a file"), *BAD_CORPUS[1:], ("tiny.jsonl", "--batch-size=2 needs 33 train tokens"))),
    case("real_model_study", "--model", "IN/hf", "--data", "IN/corpus.jsonl", "--out", "OUT/r", says="--seq-len=256 exceeds the checkpoint's max_position_embeddings=32"),
    *(case("bench_inference", "--model", f"IN/{bad}", says=says) for bad, says in NOT_A_HF_DIR),
    case("bench_inference", "--model", "IN/hf", says="--prefill=512 and --tokens=32 must fit the model's context of 32"),
    case("bench_inference", "--model", "IN/hf", "--prefill", "16", "--tokens", "8", "--gguf", "IN/noise.gguf", says="noise.gguf' is not a GGUF file"),
    case("bench_inference", "--model", "IN/hf", "--prefill", "16", "--tokens", "8", "--gguf", "IN/missing.gguf", says="missing.gguf' does not exist"),
    case("bench_inference", "--model", "IN/hf", "--prefill", "16", "--tokens", "8", "--update-doc", "IN/noise.txt", says="noise.txt' cannot be read as UTF-8"),
    case("bench_inference", "--model", "IN/hf", "--prefill", "16", "--tokens", "8", "--update-doc", "IN/corpus.jsonl", says="corpus.jsonl' has no"),
    # ---- tables and JSON: results, fits, sensitivities, text
    *(case("collect_results", f"IN/{bad}", "--out", "OUT/runs.csv", says=says) for bad, says in (
        ("missing", "missing does not exist"), ("packed", "no readable results.json"), ("noise.json", "noise.json: unreadable"),
        ("runs", "runs/a/results.json: unreadable"), ("wrongruns", "wrongruns/a/results.json: model=None must be a non-empty string"))),
    *(case("estimator_study", f"IN/{bad}", "--out", "OUT/study", says=says) for bad, says in (
        ("missing", "missing does not exist"), ("packed", "no completed runs"), ("noise.json", "noise.json is not a results.json"),
        ("runs", "runs/a/results.json is not a results.json"), ("wrongruns", "KeyError: 'quantization'"))),
    *(case("fit_scaling_law", "--runs", f"IN/{bad}", "--out", "OUT/fit.json", says=says) for bad, says in (
        ("missing", "missing; pass --format"), ("noise.csv", "noise.csv: 'utf-8' codec can't decode"), ("noise.json", "noise.json: 'utf-8' codec can't decode"), ("model.ckpt", "model.ckpt; pass --format"),
        ("list.json", "list.json: run 0 is missing field"), ("hf/config.json", "expected a JSON list of runs"), ("packed", "no runs to fit"),
        ("runs", "no runs to fit"))),
    *(case("advise_precision", "--fit", f"IN/{bad}", "--memory-bits", "1e9", "--tokens", "1e9", says=says) for bad, says in (
        ("missing.json", "missing.json' cannot be read"), ("noise.json", "noise.json' is not JSON"), ("corpus.jsonl", "corpus.jsonl' is not JSON"),
        ("packed", "packed' cannot be read"), ("hf/config.json", "fit is missing key 'law'"), ("list.json", "list.json': a fit is a JSON object"))),
    *(case("allocate_bits", "--sensitivity", f"IN/{bad}", "--budget-bits-per-param", "3", "--out", "OUT/rules.yaml", says=says) for bad, says in (
        ("missing.csv", "missing.csv' cannot be read"), ("noise.csv", "noise.csv' is not a CSV file"), ("corpus.jsonl", "no 'match'"),
        ("packed", "packed' cannot be read"), ("empty.jsonl", "no rows with side='weight'"))),
    *(case("text_to_jsonl", f"IN/{bad}", "--out", "OUT/docs.jsonl", says=says) for bad, says in (
        ("missing.txt", "missing.txt' is not a file"), ("noise.txt", "noise.txt' is not UTF-8"), ("packed", "packed' is not a file"),
        ("empty.jsonl", "no documents"))),
    *(case("train_tokenizer", "--input", f"IN/{bad}", "--vocab-size", "300", "--out", "OUT/tok.json", says=says) for bad, says in (
        *(c for c in BAD_CORPUS if c[0] != "one.jsonl"), ("one.jsonl", "one.jsonl'] has 1 documents"),  # --input is a list
        ("packed", "text_field='text' is not a column"), ("model.ckpt", "do not name one format"))),
]


@pytest.mark.parametrize("script, argv, says", CASES)
def test_bad_input_is_one_line_and_writes_nothing(script, argv, says, inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # anything written relative to the working directory lands here too
    before = sorted(p.relative_to(inputs) for p in inputs.rglob("*"))
    args = [a.replace("IN/", f"{inputs}/").replace("OUT/", f"{out}/") for a in argv]
    line = refused(capsys, script_main(script), *args)
    assert says in line, line
    assert not any(out.iterdir()), sorted(p.name for p in out.iterdir())  # nothing half-written
    assert sorted(p.relative_to(inputs) for p in inputs.rglob("*")) == before


# ---- as a user runs them: train.py, and fault_drill.py, which runs train.py


TRAIN_CASES = [
    ("init_from=IN/noise.ckpt", "noise.ckpt' is unreadable"),
    ("init_from=IN/packed", "init_from='IN/packed' is not a file"),
    ("init_from=IN/bare.ckpt", "bare.ckpt' has no embed.weight"),
    ("model=hf model.path=IN/model.gguf", "model.gguf' is a GGUF file; import it first"),
    ("model=hf model.path=IN/packed", "packed/config.json: config.json model_type=None"),
    ("data=local data.path=IN/one.jsonl", "one.jsonl' has 1 documents"),
    ("data=local data.path=IN/tiny.jsonl", "data.batch_size=8 needs 1025 train tokens"),
    ("tokenizer=hf tokenizer.path=IN/noise.json", "noise.json' is not a tokenizers JSON file"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, says", TRAIN_CASES, ids=[o for o, _ in TRAIN_CASES])
def test_train_refuses_bad_files_in_one_line(overrides, says, inputs, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "model=debug-xs", "data.batch_size=8", "trainer.max_steps=2", f"hydra.run.dir={run_dir}",
           *overrides.replace("IN/", f"{inputs}/").split()]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert says.replace("IN/", f"{inputs}/") in lines[0], lines[0]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_fault_drill_relays_train_pys_refusal(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, script_main("fault_drill"), "--kills", "1", "--steps", "10", "--out", str(tmp_path / "drill.json"),
                   "model=debug-xs", "data=local", f"data.path={inputs / 'one.jsonl'}")  # fmt: skip
    assert "train.py refused the overrides: empty corpus" in line and "one.jsonl' has 1 documents" in line, line
    assert not any(tmp_path.iterdir())
