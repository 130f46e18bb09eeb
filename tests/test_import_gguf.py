"""scripts/import_gguf.py against transformers itself (the reference).

A tiny random Llama (2 layers, hidden 64, 4 heads, 2 KV heads) is written here as a GGUF with
the `gguf` package's GGUFWriter, the way llama.cpp's convert_hf_to_gguf.py writes one: its
tensor names, q/k rows permuted per head, a byte-level BPE ("gpt2") tokenizer in the metadata,
F32 tensors and one Q8_0 tensor. Nothing is downloaded. The script runs as a user runs it
(a subprocess, from another directory); its directory must then load in plain transformers
and through our model=hf path with the original model's logits (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import refused
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from qat.hf.gguf_import import load_dequantized  # noqa: E402
from qat.hf.tokenizer import checkpoint_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_gguf.py"
HEADS, KV_HEADS, LAYERS, CONTEXT = 4, 2, 2, 64
CONFIG = dict(
    vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5, rope_theta=10000.0,
    initializer_range=0.1, bos_token_id=0, eos_token_id=1,  # 0.1: peaked attention, so a wrong RoPE shows
)
Q8_TENSOR = "blk.0.ffn_down.weight"  # stored as Q8_0; the reference model gets its dequantized value
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
TEXT = "hello world, héllo wörld\n\t日本"
ATOL = 1e-5
MAX_DIFFS: dict[str, float] = {}  # printed by the last test: the report's numbers


def vocabulary() -> tuple[list[str], list[int]]:
    """<s>, </s> (control), the 256 bytes as byte-level BPE spells them, then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelled = bytes_to_unicode()
    tokens = ["<s>", "</s>", *(spelled[b] for b in range(256)), *(a + b for a, b in MERGES)]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
    return tokens, types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: Hugging Face rotates halves of each head,
    llama.cpp interleaved pairs; transformers' GGUF reader applies the inverse."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, arch: str = "llama", permute: bool = True, extra: dict | None = None) -> None:
    """`model` as llama.cpp would write it (no output.weight when the embeddings are tied);
    `extra`: more tensors (name -> array)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(CONFIG["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, types = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, value in model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name == "output.weight" and cfg.tie_word_embeddings:
            continue
        w = value.numpy().astype(np.float32)
        if permute and key.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        if permute and key.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if name == Q8_TENSOR:
            writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w))
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_llama(**overrides) -> transformers.LlamaForCausalLM:
    """The reference: a random Llama whose Q8_TENSOR holds exactly what Q8_0 stores."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, **overrides})).eval()
    down = model.model.layers[0].mlp.down_proj.weight
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        down.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(down.numpy(), q8), q8)))
    return model


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """As a user runs it: another working directory, no PYTHONPATH (the package is installed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[transformers.LlamaForCausalLM, Path]:
    """(the reference model, the directory holding tiny.gguf)."""
    directory = tmp_path_factory.mktemp("gguf")
    model = tiny_llama()
    write_gguf(directory / "tiny.gguf", model)
    return model, directory


@pytest.fixture(scope="module")
def imported(reference) -> Path:
    """The script's output, written with --force over an existing directory (relative paths)."""
    _, directory = reference
    (directory / "hf").mkdir()
    (directory / "hf" / "stale.txt").write_text("replaced only once the new directory is complete")
    proc = run_script("tiny.gguf", "--out", "hf", "--force", cwd=directory)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "model=hf model.path=hf" in proc.stdout
    return directory / "hf"


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (2, CONTEXT), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(a, b, idx: torch.Tensor) -> float:
    def logits(m):
        out = m(idx)
        return out.logits if hasattr(out, "logits") else out

    return (logits(a) - logits(b)).abs().max().item()


# ---------------------------------------------------------------- the imported directory


@pytest.mark.slow
def test_imported_directory_is_plain_and_gives_the_original_logits(reference, imported):
    model, directory = reference
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(directory / "tiny.gguf").tensors}
    assert stored.pop(Q8_TENSOR) == gguf.GGMLQuantizationType.Q8_0 and set(stored.values()) == {gguf.GGMLQuantizationType.F32}
    assert sorted(p.name for p in imported.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    )
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".hf")]  # no temp or old directory left
    config = json.loads((imported / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(imported).eval()
    # Permutation undone and Q8_0 dequantized exactly: every tensor equals the reference's.
    original, loaded = model.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)
    MAX_DIFFS["transformers: original vs imported"] = diff = max_diff(model, reloaded, tokens())
    assert diff < ATOL


@pytest.mark.slow
def test_tokenizer_round_trips(reference, imported):
    _, directory = reference
    tok = transformers.AutoTokenizer.from_pretrained(imported)
    ids = tok(TEXT).input_ids
    assert ids[0] == CONFIG["bos_token_id"] and tok.eos_token == "</s>"
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert set(ids) & set(range(258, 258 + len(MERGES)))  # the merges are used
    assert ids == transformers.AutoTokenizer.from_pretrained(directory, gguf_file="tiny.gguf")(TEXT).input_ids
    assert checkpoint_tokenizer(str(imported)).encode(TEXT) == ids  # tokenizer=hf_model: <s> first, as Llama


@pytest.mark.slow
def test_model_hf_import_reproduces_transformers(reference, imported):
    """What `python train.py model=hf model.path=DIR quant=bf16` builds, without the trainer."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from qat.hf.load import load_hf_llama
    from qat.train.lifecycle import build_net, check_model

    model, _ = reference
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model=hf", f"model.path={imported}", "quant=bf16", f"data.seq_len={CONTEXT}"])
    check_model(cfg)
    tokenizer = instantiate(cfg.tokenizer)
    assert tokenizer.eos_id == CONFIG["eos_token_id"] and tokenizer.bos_id == CONFIG["bos_token_id"]
    MAX_DIFFS["qat load_hf_llama vs original"] = diff = max_diff(model, load_hf_llama(imported).eval(), tokens(1))
    assert diff < ATOL
    MAX_DIFFS["qat build_net (quant=bf16) vs original"] = diff = max_diff(model, build_net(cfg, tokenizer.vocab_size).eval(), tokens(1))
    assert diff < ATOL


@pytest.mark.slow
def test_bfloat16_output(reference, tmp_path):
    model, directory = reference
    proc = run_script(str(directory / "tiny.gguf"), "--out", "bf16", "--dtype", "bfloat16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    original, loaded = model.state_dict(), reloaded.state_dict()
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(original[k].to(torch.bfloat16), loaded[k]) for k in original)


def test_tied_embeddings_in_process(tmp_path):
    """llama.cpp writes no output.weight for tied embeddings; import_gguf() called directly."""
    from qat.hf.gguf_import import import_gguf
    from qat.hf.load import load_hf_llama

    model = tiny_llama(tie_word_embeddings=True)
    write_gguf(tmp_path / "tied.gguf", model)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(tmp_path / "tied.gguf").tensors}
    out = import_gguf(tmp_path / "tied.gguf", tmp_path / "tied")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    net = load_hf_llama(out).eval()
    assert net.cfg.tie_embeddings
    MAX_DIFFS["qat load_hf_llama vs original (tied)"] = diff = max_diff(model, net, tokens(2))
    assert diff < ATOL


def test_the_permutation_matters(reference, tmp_path):
    """The comparison above can fail: q/k rows written unpermuted give other logits."""
    model, _ = reference
    write_gguf(tmp_path / "unpermuted.gguf", model, permute=False)
    assert max_diff(model, load_dequantized(tmp_path / "unpermuted.gguf", "float32"), tokens()) > 1e-3


# ---------------------------------------------------------------- bad input: one line, exit code 2


@pytest.fixture
def script_main(monkeypatch, tmp_path):
    """The script's main(), run in this process from tmp_path (main's return value is the exit
    code: `sys.exit(main())`); the command-line run itself is checked once, below."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_gguf_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    return module.main


def test_missing_file_not_a_gguf_and_bad_dtype_are_refused(script_main, capsys, tmp_path):
    assert "absent.gguf" in refused(capsys, script_main, "absent.gguf", "--out", "out")
    (tmp_path / "notes.gguf").write_text("not a model")
    message = refused(capsys, script_main, "notes.gguf", "--out", "out")
    assert "notes.gguf" in message and "not a GGUF" in message and "b'GGUF'" in message
    message = refused(capsys, script_main, "notes.gguf", "--out", "out", "--dtype", "float16")
    assert "'float16'" in message and "float32, bfloat16" in message
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_force(reference, script_main, capsys, tmp_path):
    _, directory = reference
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep me")
    message = refused(capsys, script_main, str(directory / "tiny.gguf"), "--out", "full")
    assert "'full'" in message and "--force" in message
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_other_architecture_and_dropped_tensors_are_refused(reference, script_main, capsys, tmp_path):
    model, _ = reference
    write_gguf(tmp_path / "qwen.gguf", model, arch="qwen2")
    message = refused(capsys, script_main, "qwen.gguf", "--out", "out")
    assert "general.architecture='qwen2'" in message and "allowed: 'llama'" in message
    # Llama 3.1 rope scaling lives in a rope_freqs tensor that transformers' reader drops.
    write_gguf(tmp_path / "llama31.gguf", model, extra={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    message = refused(capsys, script_main, "llama31.gguf", "--out", "out", "--force")
    assert "'rope_freqs.weight'" in message and "ignores" in message
    assert not (tmp_path / "out").exists()


def test_missing_extra_names_the_install_command(monkeypatch):
    import qat.hf.gguf_import as gi

    monkeypatch.setattr(gi, "REQUIRED_MODULES", ("gguf_not_installed_here",))
    with pytest.raises(ValueError) as err:
        gi.require_extra()
    assert "\n" not in str(err.value) and 'pip install -e ".[gguf]"' in str(err.value)


@pytest.mark.slow
def test_bad_input_exits_2_on_the_command_line(tmp_path):
    proc = run_script("absent.gguf", "--out", "out", cwd=tmp_path)  # about 6 s: the script imports lightning via qat.data
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "absent.gguf" in proc.stderr


def test_report_max_differences():
    print("\nmax |logit difference| vs the original Hugging Face model (fp32):")
    for name, diff in MAX_DIFFS.items():
        print(f"  {name:45s} {diff:.2e}")
