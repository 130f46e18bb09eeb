"""scripts/export_gguf.py: a QAT checkpoint as a llama.cpp GGUF file.

Tiny checkpoints (debug-xs with GQA: 2 query heads, 1 KV head) are built in-process with the
real configs (quant=gguf_q4_0 / gguf_q8_0) and random weights, written with
`write_model_checkpoint`, exported, and read back with `gguf.GGUFReader`. The embedding and
lm_head are given values Q8_0 stores exactly, so every logit comparison sees only what the
export decides. The references: training's own quantized weights (bit for bit), llama.cpp's
convert_hf_to_gguf.py permutation applied to our Hugging Face export (q/k layout),
transformers' GGUF reader (logits, tokenizer) and, when llama-cpp-python is installed,
llama.cpp itself (greedy tokens).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import refused
import torch

gguf = pytest.importorskip("gguf")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qat.packed.gguf_export import export_gguf  # noqa: E402
from qat.packed.gguf_tensors import rope_freq_factors  # noqa: E402
from qat.packed.gguf_tokenizer import BYTE_SENTINEL_MERGE, converted_tokenizer, gguf_field  # noqa: E402
from qat.quant.quantizer import fake_quantize  # noqa: E402
from qat.train.checkpoint import load_trained, write_model_checkpoint  # noqa: E402
from qat.train.lifecycle import build_net  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "export_gguf.py"
Q = gguf.GGMLQuantizationType
MODEL = ["model=debug-xs", "model.n_kv_head=1"]  # d 128, ffn 384, head_dim 64: multiples of 32
LINEARS = {"attn.proj": "attn_output", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}
TEXT = "the farm: hello world, héllo 42\n\tend"
MAX_DIFFS: dict[str, float] = {}  # printed by the last test: the report's numbers


def run_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=[*MODEL, *overrides]), resolve=True)


@torch.no_grad()
def randomize(net: torch.nn.Module, seed: int) -> None:
    """Weights of std 0.1 (peaked attention, so a wrong RoPE layout shows), norms in [0.5, 1.5],
    embedding and lm_head on values Q8_0 stores exactly (its re-quantization is the identity)."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1 if p.dim() == 2 else 0.5 + torch.rand(p.shape, generator=g))
    for w in {id(w): w for w in (net.embed.weight, net.lm_head.weight)}.values():
        w.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q.Q8_0), Q.Q8_0)))


def make_checkpoint(path: Path, *overrides: str, seed: int = 0) -> Path:
    cfg = run_config(*overrides)
    net = build_net(cfg, instantiate(OmegaConf.create(cfg["tokenizer"])).vocab_size)
    randomize(net, seed)
    return write_model_checkpoint(path, net, cfg, step=7)


def read(path: Path) -> SimpleNamespace:
    """fields: key -> Python value (strings decoded); tensors: name -> (type, raw data, [rows, cols])."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = gguf_field(f)[0]
        fields[key] = value.decode() if isinstance(value, bytes) else [v.decode() for v in value] if value and isinstance(value, list) and isinstance(value[0], bytes) else value
    tensors = {t.name: (t.tensor_type, np.array(t.data), [int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    return SimpleNamespace(fields=fields, tensors=tensors)


def decoded(file: SimpleNamespace, name: str) -> np.ndarray:
    qtype, data, shape = file.tensors[name]
    return gguf.quants.dequantize(data, qtype).reshape(shape)


def trained_weights(net: torch.nn.Module) -> dict[str, np.ndarray]:
    """Training's quantized weight of every block linear (the forward's own cached weight),
    under its GGUF name, qkv split into q / k / v."""
    from qat.hf.convert import qkv_rows

    def weight(layer: torch.nn.Module) -> np.ndarray:  # an excluded layer is a plain nn.Linear
        with torch.no_grad():
            return (layer.quantized_weight() if hasattr(layer, "quantized_weight") else layer.weight).float().numpy()

    out = {}
    for i, block in enumerate(net.layers):
        qkv = weight(block.attn.qkv)
        for part, (start, end, _) in qkv_rows(net.cfg).items():
            out[f"blk.{i}.attn_{part}.weight"] = qkv[start:end]
        for ours, theirs in LINEARS.items():
            out[f"blk.{i}.{theirs}.weight"] = weight(net.get_submodule(f"layers.{i}.{ours}"))
    return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (Hugging Face q/k rows -> GGUF rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> SimpleNamespace:
    """A quant=gguf_q4_0 checkpoint, its export (defaults), the file read back and the model."""
    directory = tmp_path_factory.mktemp("q4")
    ckpt = make_checkpoint(directory / "q4.ckpt", "quant=gguf_q4_0")
    counts = export_gguf(ckpt, directory / "model.gguf")
    net = load_trained(ckpt).net
    return SimpleNamespace(dir=directory, ckpt=ckpt, path=directory / "model.gguf", counts=counts, file=read(directory / "model.gguf"), net=net)


# ---------------------------------------------------------------- the file


def test_metadata(q4):
    f, cfg = q4.file.fields, q4.net.cfg
    expected = {
        "general.architecture": "llama", "llama.context_length": cfg.max_seq_len, "llama.embedding_length": 128,
        "llama.block_count": 1, "llama.feed_forward_length": 384, "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1, "llama.rope.dimension_count": 64, "llama.vocab_size": 257,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0), "general.quantization_version": gguf.GGML_QUANT_VERSION,
    }  # fmt: skip
    assert {k: f[k] for k in expected} == expected
    assert f["llama.rope.freq_base"] == cfg.rope_theta and math.isclose(f["llama.attention.layer_norm_rms_epsilon"], cfg.norm_eps, rel_tol=1e-6)
    assert "llama.attention.key_length" not in f  # head_dim = d / heads
    provenance = json.loads(f["qat.quantization"])
    assert provenance["weight"]["grid"] == "int_zero" and provenance["step"] == 7 and provenance["embeddings"] == "q8_0"


def test_tensor_types_and_shapes(q4):
    types = {name: t[0] for name, t in q4.file.tensors.items()}
    shapes = {name: t[2] for name, t in q4.file.tensors.items()}
    assert types == {
        "token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0, "output_norm.weight": Q.F32,
        "blk.0.attn_norm.weight": Q.F32, "blk.0.ffn_norm.weight": Q.F32,
        **{f"blk.0.{n}.weight": Q.Q4_0 for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")},
    }  # fmt: skip
    assert shapes["blk.0.attn_q.weight"] == [128, 128] and shapes["blk.0.attn_k.weight"] == [64, 128] and shapes["blk.0.ffn_down.weight"] == [128, 384]
    assert q4.counts == {"Q4_0": 7, "Q8_0": 2, "F32": 3}
    assert np.array_equal(decoded(q4.file, "token_embd.weight"), q4.net.embed.weight.detach().numpy())  # exact by construction
    assert not [p.name for p in q4.dir.iterdir() if p.name.startswith(".")]  # no temp file left


def test_q4_0_blocks_decode_to_trainings_weights_bit_for_bit(q4):
    weights = trained_weights(q4.net)
    assert len(weights) == 7
    for name, trained in weights.items():
        got = decoded(q4.file, name)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), trained.view(np.uint32)), name
        # Stored nibbles are (c - 7) + 8 in 1..15: -8 d (nibble 0) is not a level of int_zero.
        blocks = q4.file.tensors[name][1].reshape(-1, 18)[:, 2:]
        nibbles = np.concatenate([blocks & 0x0F, blocks >> 4])
        assert nibbles.min() >= 1 and nibbles.max() <= 15 and len(np.unique(nibbles)) == 15, name


def test_qk_rows_are_llama_cpps_permutation_of_the_hugging_face_export(q4):
    """llama.cpp's own converter applied to our Hugging Face export (HF rotates halves) gives the
    GGUF rows: the interleaved RoPE layout, which is ours."""
    from qat.hf.convert import hf_state_dict
    from qat.hf.export import plain_state

    cfg = q4.net.cfg
    hf = {k: v.float().numpy() for k, v in hf_state_dict(plain_state(q4.net, "quantized"), cfg).items()}
    for part, heads in (("q", cfg.n_head), ("k", cfg.kv_heads)):
        theirs = hf[f"model.layers.0.self_attn.{part}_proj.weight"]
        ours = decoded(q4.file, f"blk.0.attn_{part}.weight")
        assert np.array_equal(ours, llama_cpp_permute(theirs, heads)) and not np.array_equal(ours, theirs), part
    assert np.array_equal(decoded(q4.file, "blk.0.attn_v.weight"), hf["model.layers.0.self_attn.v_proj.weight"])


def test_q8_0_preset_with_an_excluded_layer_tied_and_f16_embeddings(tmp_path):
    rules = 'quant.rules=[{match: "layers.0.mlp.down", exclude: true}]'
    ckpt = make_checkpoint(tmp_path / "q8.ckpt", "quant=gguf_q8_0", rules, "model.tie_embeddings=true", seed=1)
    assert export_gguf(ckpt, tmp_path / "q8.gguf", embeddings="f16") == {"Q8_0": 6, "F32": 4, "F16": 1}
    file, net = read(tmp_path / "q8.gguf"), load_trained(ckpt).net
    assert file.fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert "output.weight" not in file.tensors  # tied: llama.cpp reuses token_embd
    assert file.tensors["token_embd.weight"][0] == Q.F16 and file.tensors["blk.0.ffn_down.weight"][0] == Q.F32
    for name, trained in trained_weights(net).items():  # the excluded ffn_down: its fp32 weight as is
        assert np.array_equal(decoded(file, name).view(np.uint32), trained.view(np.uint32)), name
        assert file.tensors[name][0] == (Q.F32 if "ffn_down" in name else Q.Q8_0)


@pytest.mark.parametrize("scale", ["rms_mse", "absmax"])
def test_q4_1_blocks_hold_trainings_offset_grid_bit_for_bit(tmp_path, scale):
    """quant=gguf_q4_1: d and m float16, codes 0..15, c * d + m decoded by gguf equals training's
    weight bit for bit. With scale=absmax the grid is llama.cpp's own Q4_1 rule (d = (max - min) /
    15, m = min), so gguf's quantizer of the latent weight finds the same blocks wherever its
    rounding agrees with ours: both store float16(min) and float16((max - min) / 15), and its codes
    round (x - min) / d with the unrounded min and d, ours with the stored ones (measured on
    this layer: 99.8% of the codes and 94.6% of the whole blocks equal)."""
    ckpt = make_checkpoint(tmp_path / "q41.ckpt", "quant=gguf_q4_1", f"quant.weight.scale={scale}", seed=2)
    assert export_gguf(ckpt, tmp_path / "q41.gguf") == {"Q4_1": 7, "Q8_0": 2, "F32": 3}
    file, net = read(tmp_path / "q41.gguf"), load_trained(ckpt).net
    assert file.fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    for name, trained in trained_weights(net).items():
        assert file.tensors[name][0] == Q.Q4_1
        got = decoded(file, name)
        assert np.array_equal(got.view(np.uint32), trained.view(np.uint32)), name
        blocks = file.tensors[name][1].reshape(-1, 20)
        nibbles = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4])
        assert nibbles.min() == 0 and nibbles.max() == 15, name  # all 16 levels in use, no symmetric code set
    if scale == "absmax":
        latent = net.layers[0].mlp.up.weight.detach().numpy()
        ours = file.tensors["blk.0.ffn_up.weight"][1].reshape(-1, 20)
        theirs = gguf.quants.quantize(latent, Q.Q4_1).reshape(-1, 20)
        assert (ours[:, :4] == theirs[:, :4]).all()  # d and m
        same_codes = np.concatenate([ours[:, 4:] & 0x0F, ours[:, 4:] >> 4]) == np.concatenate([theirs[:, 4:] & 0x0F, theirs[:, 4:] >> 4])
        print(f"Q4_1 absmax vs gguf's quantizer: codes {same_codes.mean():.4f}, blocks {(ours == theirs).all(axis=1).mean():.4f} equal")
        assert same_codes.mean() > 0.99 and (ours == theirs).all(axis=1).mean() > 0.9


def test_offset_grid_is_refused_where_it_cannot_be_held(tmp_path):
    """Q4_1 is 4-bit only; the packed format and GPTQ have no offset grid: one line each."""
    from qat import QuantizerConfig
    from qat.packed.export import export_checkpoint
    from qat.quant.gptq import gptq_unsupported_reason

    with pytest.raises(ValueError, match="grid='int_zero' is not allowed with asymmetric=true; choose one of 'int'"):
        QuantizerConfig(bits=4, grid="int_zero", asymmetric=True)
    with pytest.raises(ValueError, match="scale='mse_search' is not allowed with asymmetric=true"):
        QuantizerConfig(bits=4, scale="mse_search", asymmetric=True)
    with pytest.raises(ValueError, match="asymmetric='yes' is not allowed; use true or false"):
        QuantizerConfig(bits=4, asymmetric="yes")
    assert "asymmetric" in gptq_unsupported_reason(QuantizerConfig(bits=4, asymmetric=True))
    ckpt = make_checkpoint(tmp_path / "q41.ckpt", "quant=gguf_q4_1", "quant.bits=8", seed=3)
    with pytest.raises(ValueError, match="weight bits=8 with asymmetric=true \\(Q4_1: need 4\\)"):
        export_gguf(ckpt, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="asymmetric=true .* is not in the packed format"):
        export_checkpoint(ckpt, tmp_path / "packed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q41.ckpt"]


def test_llama3_rope_scaling_writes_llama_cpps_frequency_factors():
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3, against ours."""
    from qat.models.rope import RopeScaling

    s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    cfg = SimpleNamespace(head_dim=64, rope_theta=5e5, rope_scaling=s)
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    low, high = s.original_max_seq_len / s.low_freq_factor, s.original_max_seq_len / s.high_freq_factor
    expected = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            expected.append(1.0)
        elif wavelen > low:
            expected.append(s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            expected.append(1 / ((1 - smooth) / s.factor + smooth))
    got = rope_freq_factors(cfg)
    assert got.dtype == np.float32 and np.allclose(got, expected, rtol=1e-6) and got.min() == 1.0 and got.max() == 8.0


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_vocabulary(q4):
    f = q4.file.fields
    tokens = f["tokenizer.ggml.tokens"]
    assert f["tokenizer.ggml.model"] == "gpt2" and len(tokens) == 257 and tokens[256] == "<|endoftext|>"
    assert tokens[ord("a")] == "a" and tokens[ord("\n")] == "Ċ" and tokens[ord(" ")] == "Ġ"  # byte-level spellings, id = byte
    assert f["tokenizer.ggml.token_type"] == [int(gguf.TokenType.NORMAL)] * 256 + [int(gguf.TokenType.CONTROL)]
    assert f["tokenizer.ggml.eos_token_id"] == 256 and f["tokenizer.ggml.add_bos_token"] == False  # noqa: E712 (a bool)
    assert f["tokenizer.ggml.merges"] == [BYTE_SENTINEL_MERGE] and "tokenizer.ggml.bos_token_id" not in f


def test_padding_rows_get_unused_tokens():
    from qat.data.tokenizer import ByteTokenizer

    vocab = converted_tokenizer(gguf, ByteTokenizer(), 260)
    assert vocab.tokens[257:] == ["[PAD257]", "[PAD258]", "[PAD259]"] and vocab.types[257:] == [int(gguf.TokenType.UNUSED)] * 3
    with pytest.raises(ValueError, match="257 tokens but the model's vocab_size is 200"):
        converted_tokenizer(gguf, ByteTokenizer(), 200)


def bpe_export(directory: Path, llama3: bool = False) -> SimpleNamespace:
    """A byte-level BPE tokenizer.json (GPT-2's pre-tokenizer, as scripts/train_tokenizer.py
    writes, or Llama 3's split regex), a checkpoint that uses it, and its export."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from qat.packed.gguf_tokenizer import LLAMA3_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if llama3
        else pre_tokenizers.ByteLevel(add_prefix_space=False)
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT, "the farm has a cow and the farm has a hen", "hello hello world 1234, it's 56789"] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    ckpt = make_checkpoint(directory / "bpe.ckpt", "quant=gguf_q4_0", "tokenizer=hf", f"tokenizer.path={directory / 'tokenizer.json'}", seed=2)
    export_gguf(ckpt, directory / "bpe.gguf")
    return SimpleNamespace(dir=directory, tokenizer=tok, ckpt=ckpt, path=directory / "bpe.gguf", file=read(directory / "bpe.gguf"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> SimpleNamespace:
    return bpe_export(tmp_path_factory.mktemp("bpe"))


def test_bpe_tokenizer_json_is_converted(bpe):
    f, vocab = bpe.file.fields, bpe.tokenizer.get_vocab()
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) and f["llama.vocab_size"] == len(vocab)
    spec = json.loads((bpe.dir / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]] and len(f["tokenizer.ggml.merges"]) > 20
    eos = bpe.tokenizer.token_to_id("<|endoftext|>")
    assert f["tokenizer.ggml.eos_token_id"] == eos and f["tokenizer.ggml.token_type"][eos] == int(gguf.TokenType.CONTROL)
    assert f["tokenizer.ggml.pre"] == "gpt-2"


def test_tokenizer_gguf_is_copied_key_for_key(q4, bpe, tmp_path):
    ckpt = make_checkpoint(tmp_path / "other.ckpt", "quant=gguf_q4_0", seed=3)
    export_gguf(ckpt, tmp_path / "copied.gguf", tokenizer_gguf=q4.path)
    source, copied = q4.file.fields, read(tmp_path / "copied.gguf").fields
    keys = sorted(k for k in source if k.startswith("tokenizer."))
    assert len(keys) >= 7 and keys == sorted(k for k in copied if k.startswith("tokenizer.")) and all(source[k] == copied[k] for k in keys)
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model's vocab_size is 257"):
        export_gguf(ckpt, tmp_path / "wrong.gguf", tokenizer_gguf=bpe.path)
    assert not (tmp_path / "wrong.gguf").exists()


# ---------------------------------------------------------------- refusals: one line, exit code 2


@pytest.fixture
def script_main(monkeypatch, tmp_path):
    """The script's main() in this process, run from tmp_path (its return value is the exit code)."""
    spec = importlib.util.spec_from_file_location("export_gguf_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    return module.main


@pytest.mark.parametrize(
    "overrides, says",
    [
        ((), ["layer layers.0.attn.qkv:", "activation bits=4", "weight rotation='hadamard'", "weight grid='int'", "5 of 5 linears", "quant=gguf_q4_0"]),
        (("quant=gguf_q4_0", "quant.weight.scale_dtype=float32"), ["layers.0.attn.qkv", "scale_dtype='float32'", "need 'float16'"]),
        (("quant=gguf_q4_0", "quant.bits=3"), ["weight bits=3", "need 4 or 8"]),
        (("quant=gguf_q8_0", 'quant.rules=[{match: "layers.0.mlp.*", weight: {granularity: 64}}]'), ["layer layers.0.mlp.gate:", "granularity=64", "3 of 5"]),
    ],
    ids=["quest_w4a4", "fp32_scale", "3_bits", "group_64"],
)
def test_inexpressible_checkpoints_are_refused(script_main, capsys, tmp_path, overrides, says):
    make_checkpoint(tmp_path / "bad.ckpt", *overrides)
    message = refused(capsys, script_main, "--ckpt", "bad.ckpt", "--out", "model.gguf")
    assert all(s in message for s in says), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]  # nothing written


def test_bad_arguments_and_existing_out(q4, script_main, capsys, tmp_path):
    ckpt = str(q4.ckpt)
    assert "'absent.ckpt' does not exist" in refused(capsys, script_main, "--ckpt", "absent.ckpt", "--out", "m.gguf")
    assert "--embeddings='f32'" in refused(capsys, script_main, "--ckpt", ckpt, "--out", "m.gguf", "--embeddings", "f32")
    (tmp_path / "notes.gguf").write_text("not a model")
    assert "not a GGUF file" in refused(capsys, script_main, "--ckpt", ckpt, "--out", "m.gguf", "--tokenizer-gguf", "notes.gguf")
    (tmp_path / "adir").mkdir()
    assert "is a directory" in refused(capsys, script_main, "--ckpt", ckpt, "--out", "adir")
    (tmp_path / "m.gguf").write_bytes(b"old")
    assert "--force" in refused(capsys, script_main, "--ckpt", ckpt, "--out", "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    assert script_main(["--ckpt", ckpt, "--out", "m.gguf", "--force"]) == 0
    assert "decodes to training's weights exactly" in capsys.readouterr().out
    assert (tmp_path / "m.gguf").read_bytes() == q4.path.read_bytes()  # deterministic, and replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "m.gguf", "notes.gguf"]


# ---------------------------------------------------------------- against transformers and llama.cpp


@pytest.mark.slow
def test_transformers_reads_our_logits_and_tokenizer(q4, bpe):
    """transformers' GGUF reader (dequantizes, un-permutes q/k) computes our fake-quant model's
    logits; with q/k rows in the other layout it would not."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from qat.hf.gguf_import import load_dequantized

    idx = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    model = load_dequantized(q4.path, "float32")
    with torch.no_grad():
        ours, theirs = q4.net(idx), model(idx).logits
        MAX_DIFFS["transformers (GGUF Q4_0) vs our fake-quant model"] = diff = (ours - theirs).abs().max().item()
        assert diff < 1e-5
        attn = model.model.layers[0].self_attn  # the other layout: llama.cpp's permutation applied once more
        for proj, heads in ((attn.q_proj, 2), (attn.k_proj, 1)):
            proj.weight.copy_(torch.from_numpy(llama_cpp_permute(proj.weight.numpy(), heads)))
        assert (ours - model(idx).logits).abs().max().item() > 1e-2
    ours_tok = load_trained(bpe.ckpt).tokenizer
    theirs_tok = transformers.AutoTokenizer.from_pretrained(bpe.dir, gguf_file=bpe.path.name)
    assert theirs_tok(TEXT, add_special_tokens=False).input_ids == ours_tok.encode(TEXT)


def _export_from_another_directory(ckpt: Path, out: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(SCRIPT), "--ckpt", str(ckpt), "--out", str(out)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=["gguf_q4_0", "gguf_q4_1"])
def trained(request, tmp_path_factory) -> Path:
    """A real run: train.py quant=gguf_q4_0 (Q4_0) or gguf_q4_1 (Q4_1) on debug-xs (byte
    tokenizer) for 150 steps, enough for confident next-token predictions (val loss about 1.0;
    about 40 s on 2 cores)."""
    from conftest import run_train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_train(run_dir, "model=debug-xs", f"quant={request.param}", "trainer.max_steps=150", "trainer.val_check_interval=75", "checkpoint.every_n_steps=150")
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_command_line_after_a_real_training_run(trained, tmp_path):
    """The script as a user runs it (another directory, no PYTHONPATH) on train.py's checkpoint."""
    proc = _export_from_another_directory(trained, tmp_path / "trained.gguf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    file, net = read(tmp_path / "trained.gguf"), load_trained(trained).net
    for name, value in trained_weights(net).items():
        assert np.array_equal(decoded(file, name).view(np.uint32), value.view(np.uint32)), name
    proc = _export_from_another_directory(tmp_path / "absent.ckpt", tmp_path / "x.gguf", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, key, value",
    [("gguf_q4_0", "estimator", "ste"), ("gguf_q4_1", "estimator", "ste"), ("gguf_q4_0", "scale_update", "learned")],
)
def test_other_estimators_and_learned_scales_train_and_export_bit_exact(preset, key, value, tmp_path):
    """STE with both presets, and Q4_0 with learned per-group scales (range learning): 10 steps
    move the weights (the loss falls) and the export still decodes to training's weights bit
    for bit, so it writes the scale training used, not a refit of the weight."""
    from conftest import run_train

    run_train(tmp_path / "run", "model=debug-xs", f"quant={preset}", f"quant.weight.{key}={value}", "trainer.max_steps=10",
              "trainer.val_check_interval=10", "checkpoint.every_n_steps=10")
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["status"] == "completed" and result["val_loss"] < math.log(257)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    kind = "Q4_1" if preset == "gguf_q4_1" else "Q4_0"
    assert export_gguf(ckpt, tmp_path / "trained.gguf")[kind] == 7
    file, net = read(tmp_path / "trained.gguf"), load_trained(ckpt).net
    quantizer = net.layers[0].mlp.up.weight_quantizer
    assert getattr(quantizer.cfg, key) == value
    if value == "learned":  # the scales moved off the weights' absmax fit, and the export wrote them
        refit = fake_quantize(net.layers[0].mlp.up.weight.detach(), dataclasses.replace(quantizer.cfg, scale_update="refit"), quantizer.grid)
        assert not torch.equal(refit.scale.reshape(quantizer.scale.shape), quantizer.scale.detach())
    for name, trained in trained_weights(net).items():
        assert np.array_equal(decoded(file, name).view(np.uint32), trained.view(np.uint32)), name


# pip install -e ".[llamacpp]" (builds llama.cpp); checked before any fixture trains a model.
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")


def llama_cpp_model(path: Path, n_ctx: int):
    from qat.inference.llama_cpp import load_llama

    return load_llama(path, n_ctx, threads=1, logits_all=True)


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_computes_our_logits_with_16_bit_weights(tmp_path):
    """Without quantized weights llama.cpp quantizes no activations either: F32 linears, F16
    embedding and head hold our values exactly, so what remains is llama.cpp's float16 KV cache.
    Any error in layout, RoPE, GQA or norms would be of order 1."""
    ckpt = make_checkpoint(tmp_path / "bf16.ckpt", "quant=bf16", seed=4)
    loaded = load_trained(ckpt)
    with torch.no_grad():
        loaded.net.embed.weight.copy_(loaded.net.embed.weight.half().float())  # F16 stores it exactly
        loaded.net.lm_head.weight.copy_(loaded.net.lm_head.weight.half().float())
    write_model_checkpoint(ckpt, loaded.net, loaded.config, step=1)
    assert export_gguf(ckpt, tmp_path / "f32.gguf", embeddings="f16") == {"F32": 10, "F16": 2}
    seq = torch.randint(0, 257, (48,), generator=torch.Generator().manual_seed(4)).tolist()
    llm = llama_cpp_model(tmp_path / "f32.gguf", len(seq))
    try:
        llm.eval(seq)
        theirs = np.array(llm.scores[: len(seq)])
    finally:
        llm.close()
    with torch.no_grad():
        ours = loaded.net(torch.tensor([seq]))[0].numpy()
    MAX_DIFFS["llama.cpp (F32 weights) vs our model, 48 positions"] = diff = float(np.abs(ours - theirs).max())
    assert diff < 1e-2 and (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_generates_our_greedy_tokens(trained, tmp_path):
    """The trained Q4_0 / Q4_1 model in llama.cpp: the same 32 greedy tokens as our fake-quant
    model. llama.cpp's CPU dot products round the activations to 8 bits (Q8_0, Q8_1 against
    Q4_1) against the 4-bit weights, so its logits differ by a few hundredths; the measured
    maximum is reported."""
    from qat.inference.generation import generate

    export_gguf(trained, tmp_path / "trained.gguf")
    net, tokenizer, *_ = load_trained(trained)
    prompt, steps = tokenizer.encode("farm:"), 32
    llm = llama_cpp_model(tmp_path / "trained.gguf", len(prompt) + steps)
    try:
        assert llm.tokenize(b"farm: the cow", add_bos=False) == tokenizer.encode("farm: the cow")  # the converted vocabulary
        theirs, logits = [], []
        llm.eval(prompt)
        for _ in range(steps):
            logits.append(np.array(llm.scores[llm.n_tokens - 1]))
            theirs.append(int(logits[-1].argmax()))
            llm.eval([theirs[-1]])
    finally:
        llm.close()
    ours = generate(net, prompt, steps, temperature=0)
    with torch.no_grad():
        reference = net(torch.tensor([prompt + theirs[:-1]]))[0, len(prompt) - 1 :].numpy()  # ours on llama.cpp's tokens
    diff = float(np.abs(reference - np.stack(logits)).max())
    kind = next(t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "trained.gguf").tensors if t.name == "blk.0.ffn_up.weight")
    MAX_DIFFS[f"llama.cpp ({kind}) vs our fake-quant model, 32 greedy steps"] = diff
    MAX_DIFFS[f"  the largest |logit| there ({kind})"] = float(np.abs(reference).max())
    top2 = np.sort(reference, axis=-1)[:, -2:]
    assert ours == theirs, f"first difference at step {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}; smallest top-2 gap {float((top2[:, 1] - top2[:, 0]).min()):.3f}, max |logit diff| {diff:.3f}"
    assert tokenizer.decode(ours) == tokenizer.decode(theirs) and diff < 0.25


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("llama3", [False, True], ids=["gpt2_pre", "llama3_pre"])
def test_llama_cpp_tokenizes_as_we_do(tmp_path, llama3):
    """A converted tokenizer.json (tokenizer.ggml.pre "gpt-2" or "llama-bpe") in llama.cpp."""
    exported = bpe_export(tmp_path, llama3)
    assert exported.file.fields["tokenizer.ggml.pre"] == ("llama-bpe" if llama3 else "gpt-2")
    ours = load_trained(exported.ckpt).tokenizer
    text = TEXT + "  it's 1234567 HELLO\n\n  world!! 'll"
    llm = llama_cpp_model(exported.path, 64)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False)
        assert ids == ours.encode(text) and llm.detokenize(ids).decode() == text
    finally:
        llm.close()


def test_report_max_differences():
    print("\nmax |logit difference| (fp32):")
    for name, diff in MAX_DIFFS.items():
        print(f"  {name:60s} {diff:.2e}")
