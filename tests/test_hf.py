"""Hugging Face Llama import / export against transformers itself (the reference).

Tiny random LlamaForCausalLM models are built here and saved with save_pretrained (nothing
is downloaded): plain, GQA (saved in shards), tied embeddings, Llama 3 RoPE scaling, and a
head_dim other than hidden / heads. fp32 throughout; logits compared over the full context.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
# transformers as the reference (about 13 s with its import): in the full (CI) suite, outside the quick loop.
pytestmark = pytest.mark.slow

from hydra import compose, initialize_config_dir  # noqa: E402

from qat.data.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402
from qat.hf.config import llama_config_from_hf  # noqa: E402
from qat.hf.export import export_hf, write_hf_dir  # noqa: E402
from qat.hf.load import load_hf_llama  # noqa: E402
from qat.hf.tokenizer import byte_level_tokenizer, checkpoint_tokenizer  # noqa: E402
from qat.quant.convert import quantize_model  # noqa: E402
from qat.quant.linear import QuantLinear  # noqa: E402
from qat.quant.quantizer import Quantizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64  # max_position_embeddings of every test model: the logits are compared over all of it
VOCAB = 260  # the byte-level test tokenizer has 259 tokens; one embedding row to spare
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=CONTEXT, rms_norm_eps=1e-5, initializer_range=0.1,  # 0.1: peaked attention
)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {
    "plain": dict(),
    "gqa_sharded": dict(num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "llama3_rope": dict(rope_theta=5e5, rope_scaling=LLAMA3),
    "head_dim": dict(head_dim=24, num_key_value_heads=2),  # 4 * 24 != 64
}
ATOL = 1e-5
MAX_DIFFS: dict[str, float] = {}  # printed by the last test: the report's numbers


def save_tokenizer(directory: Path) -> None:
    """A byte-level fast tokenizer with <s> (added in front, as Llama's) and </s>."""
    from tokenizers import AddedToken, processors

    tok = byte_level_tokenizer()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(directory)


def save_hf_llama(directory: Path, variant: str) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **VARIANTS[variant]})).eval()
    model.save_pretrained(directory, **({"max_shard_size": "40KB"} if variant == "gqa_sharded" else {}))
    save_tokenizer(directory)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """variant -> (transformers model, its directory), built on first use."""
    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            directory = tmp_path_factory.mktemp(variant)
            cache[variant] = (save_hf_llama(directory, variant), directory)
        return cache[variant]

    return get


def tokens(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, CONTEXT), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(hf_model, net, idx: torch.Tensor) -> float:
    return (hf_model(idx).logits - net(idx)).abs().max().item()


# ---------------------------------------------------------------- import


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_matches_transformers(variant, checkpoints):
    hf_model, directory = checkpoints(variant)
    if variant == "gqa_sharded":
        assert (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").exists()
    net = load_hf_llama(directory).eval()
    assert net.cfg.head_dim == hf_model.config.head_dim and net.cfg.tie_embeddings == hf_model.config.tie_word_embeddings
    MAX_DIFFS[f"import {variant}"] = diff = max_diff(hf_model, net, tokens())
    assert diff < ATOL


def test_import_without_the_rope_permutation_would_differ(checkpoints, monkeypatch):
    """The comparison above can fail: loading q/k rows unpermuted changes the logits."""
    import qat.hf.convert as convert

    hf_model, directory = checkpoints("plain")
    monkeypatch.setattr(convert, "halves_to_interleaved", lambda w, heads, hd: w)
    assert max_diff(hf_model, load_hf_llama(directory).eval(), tokens()) > 1e-3


def test_default_rope_is_unchanged_without_scaling():
    from qat.models.rope import rope_frequencies

    expected = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.equal(rope_frequencies(16, 10000.0), expected)


# ---------------------------------------------------------------- export


def export_dir(tmp_path: Path, net, source: Path | None, weights: str = "latent") -> Path:
    out = tmp_path / f"export-{weights}-{'checkpoint' if source else 'bytes'}"
    out.mkdir()
    run_config = {"model": {"size": "hf", "path": str(source)}} if source else {"model": {"size": "debug"}}
    tokenizer = checkpoint_tokenizer(str(source)) if source else ByteTokenizer()
    write_hf_dir(net, tokenizer, run_config, 0, out, weights, "float32")
    return out


@pytest.mark.parametrize("variant", ["plain", "tied", "llama3_rope", "head_dim"])
def test_export_latent_loads_in_transformers_and_round_trips(variant, checkpoints, tmp_path):
    hf_model, directory = checkpoints(variant)
    net = load_hf_llama(directory).eval()
    out = export_dir(tmp_path, net, directory)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    MAX_DIFFS[f"export latent {variant}"] = diff = max_diff(reloaded, net, tokens(1))
    assert diff < ATOL
    # Import then export is the identity on every tensor (copies and permutations only).
    original, exported = hf_model.state_dict(), reloaded.state_dict()
    assert all(torch.equal(original[k], exported[k]) for k in original)


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_export_quantized_equals_our_forward_with_16_bit_inputs(rotation, checkpoints, tmp_path):
    _, directory = checkpoints("gqa_sharded")
    net = load_hf_llama(directory)
    quant = {"bits": 4, "rotation": rotation, **({"hadamard_block": 16} if rotation == "hadamard" else {})}
    quantize_model(net, quant, quant)  # W4A4
    net.eval()
    out = export_dir(tmp_path, net, directory, weights="quantized")
    meta = json.loads((out / "config.json").read_text())["qat_quantization"]
    assert (meta["exported_weights"], meta["weight"]["bits"], meta["activation"]["bits"]) == ("quantized", 4, 4)
    w4a4 = tokens(2)
    with torch.no_grad():
        full = net(w4a4)
    for layer in net.modules():  # the activation quantizer off: 16 bits, same rotation
        if isinstance(layer, QuantLinear):
            layer.input_quantizer = Quantizer(dataclasses.replace(layer.input_quantizer.cfg, bits=16))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    MAX_DIFFS[f"export quantized ({rotation})"] = diff = max_diff(reloaded, net, w4a4)
    assert diff < ATOL
    assert (reloaded(w4a4).logits - full).abs().max() > 1e-3  # the 4-bit inputs did matter


def test_exported_tokenizers_load_in_autotokenizer(checkpoints, tmp_path):
    _, directory = checkpoints("plain")
    net = load_hf_llama(directory)
    text = "héllo wörld\n\t日本"
    ours = checkpoint_tokenizer(str(directory))
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir(tmp_path, net, directory))
    assert ours.bos_id is not None and hf_tok(text).input_ids == ours.encode(text)  # <s> first, as Llama
    # Our byte tokenizer (any net of vocab >= 257 can carry it) as an equivalent fast tokenizer.
    byte_tok = transformers.AutoTokenizer.from_pretrained(export_dir(tmp_path, net, None))
    assert byte_tok(text).input_ids == ByteTokenizer().encode(text) and byte_tok.eos_token_id == 256
    assert byte_tok.decode(ByteTokenizer().encode(text)) == text
    # Our own tokenizers JSON file (tokenizer=hf), alone in its folder: a tokenizer_config is written.
    (tmp_path / "own").mkdir()
    byte_level_tokenizer().save(str(tmp_path / "own" / "tokenizer.json"))
    own = HFTokenizer(str(tmp_path / "own" / "tokenizer.json"), eos_token="<|endoftext|>")
    (tmp_path / "own-export").mkdir()
    write_hf_dir(net, own, {"model": {"size": "debug"}}, 0, tmp_path / "own-export", "latent", "float32")
    own_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "own-export")
    assert own_tok(text).input_ids == own.encode(text) and own_tok.eos_token == "<|endoftext|>"


# ---------------------------------------------------------------- configs and the first validation


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_model_hf_selects_the_checkpoint_tokenizer(checkpoints):
    _, directory = checkpoints("plain")
    cfg = compose_run("model=hf", f"model.path={directory}")
    assert cfg.tokenizer._target_ == "qat.hf.tokenizer.checkpoint_tokenizer" and cfg.tokenizer.path == str(directory)
    assert compose_run("model=hf", f"model.path={directory}", "tokenizer=byte").tokenizer._target_.endswith("ByteTokenizer")


def test_first_validation_of_16_bit_hadamard_run_equals_the_pretrained_loss(checkpoints, tmp_path):
    """QAT from a checkpoint starts where the checkpoint is: Hadamard at 16 bits is exact."""
    import lightning as L
    import torch.nn.functional as F

    from train import build

    hf_model, directory = checkpoints("gqa_sharded")
    cfg = compose_run(
        "experiment=qat_finetune", f"model.path={directory}", "data=synthetic", "data.source.num_documents=64",
        "data.source.num_val_documents=16", "data.seq_len=64", "data.batch_size=4", "data.val_batches=2",
        "trainer=cpu", "quant.bits=16", "quant.weight.hadamard_block=16", "max_tokens=2048", f"data.cache_dir={tmp_path}/cache",
    )
    parts = build(cfg, tmp_path / "run", multirun=False)
    layers = [m for m in parts.module.net.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 5 and all(m.weight_quantizer.cfg.rotation == "hadamard" and not m.weight_quantizer.cfg.enabled for m in layers)
    assert parts.module.optimizer_factory.keywords["lr"] == 2e-5  # the experiment's low LR
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    val_loss = trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)[0]["val/loss"]
    with torch.no_grad():
        losses = [(F.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten()), y.numel()) for x, y in parts.datamodule.val_dataloader()]
    reference = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    MAX_DIFFS["first val loss vs transformers"] = diff = abs(val_loss - reference.item())
    assert diff < ATOL


# ---------------------------------------------------------------- bad input: one line naming the value


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("attention_bias", True, "attention_bias=True"),
        ("mlp_bias", True, "mlp_bias=True"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("sliding_window", 4096, "sliding_window=4096"),
        ("model_type", "mistral", "model_type='mistral'"),
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "'linear'"),
        ("rope_scaling", {**LLAMA3, "beta_fast": 32}, "beta_fast=32"),
    ],
)
def test_unsupported_config_fields_are_refused(field, value, named):
    with pytest.raises(ValueError) as err:
        llama_config_from_hf({"model_type": "llama", **BASE, field: value})
    assert named in one_line(err)


def broken_copy(checkpoints, tmp_path: Path, variant: str = "gqa_sharded") -> Path:
    _, directory = checkpoints(variant)
    copy = tmp_path / "broken"
    shutil.copytree(directory, copy)
    return copy


def test_bad_directories_fail_in_one_line(checkpoints, tmp_path):
    with pytest.raises(ValueError) as err:
        load_hf_llama(tmp_path / "absent")
    assert "absent" in one_line(err)
    broken = broken_copy(checkpoints, tmp_path)
    shard = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (broken / shard).unlink()
    with pytest.raises(ValueError) as err:
        load_hf_llama(broken)
    assert shard in one_line(err) and "absent" in str(err.value)
    (broken / "config.json").unlink()
    with pytest.raises(ValueError) as err:
        load_hf_llama(broken)
    assert "config.json" in one_line(err)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError) as err:
        load_hf_llama(gguf)
    assert "is a GGUF file; import it first: python scripts/import_gguf.py" in one_line(err)


def test_missing_weights_and_tokenizer_fail_in_one_line(checkpoints, tmp_path):
    broken = broken_copy(checkpoints, tmp_path, "plain")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ValueError) as err:
        checkpoint_tokenizer(str(broken))
    assert "tokenizer.json" in one_line(err)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError) as err:
        load_hf_llama(broken)
    assert "model.safetensors" in one_line(err)


def test_tensor_shape_that_does_not_match_the_config_is_named(checkpoints, tmp_path):
    broken = broken_copy(checkpoints, tmp_path, "plain")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError) as err:
        load_hf_llama(broken)
    message = one_line(err)
    assert "mlp.down_proj.weight" in message or "mlp.gate_proj.weight" in message
    assert "(96, 64)" in message or "(64, 96)" in message


def test_export_refuses_bad_requests_before_loading(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    for kwargs, named in [
        (dict(out_dir=tmp_path / "full"), "--force"),
        (dict(out_dir=tmp_path / "new", weights="int4"), "int4"),
        (dict(out_dir=tmp_path / "new", dtype="int8"), "int8"),
        (dict(out_dir=tmp_path / "new"), "absent.ckpt"),
    ]:
        with pytest.raises(ValueError) as err:
            export_hf(tmp_path / "absent.ckpt", **kwargs)
        assert named in one_line(err)
    assert (tmp_path / "full" / "x").read_text() == "keep me" and not (tmp_path / "new").exists()


def test_report_max_differences():
    print("\nmax |logit difference| / |loss difference| vs transformers (fp32):")
    for name, diff in MAX_DIFFS.items():
        print(f"  {name:40s} {diff:.2e}")


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_resume_export_reload(checkpoints, tmp_path):
    from conftest import run_train

    from qat.train.checkpoint import load_trained

    _, directory = checkpoints("gqa_sharded")
    run = tmp_path / "run"
    common = [f"model.path={directory}", "quant.weight.hadamard_block=16", "data.seq_len=64", "trainer.val_check_interval=5", "checkpoint.every_n_steps=5"]
    run_train(run, "model=hf", *common, "trainer.max_steps=5")
    resumed = run_train(run, "model=hf", *common, "trainer.max_steps=10")
    assert "resumed from step 5" in resumed.stdout + resumed.stderr
    out = tmp_path / "export"
    for weights in ("latent", "quantized"):
        cmd = [sys.executable, str(ROOT / "scripts" / "export_hf.py"), "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--weights", weights, "--force"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    loaded = load_trained(run / "checkpoints" / "last.ckpt")
    assert loaded.step == 10
    for layer in loaded.net.modules():
        if isinstance(layer, QuantLinear):
            layer.input_quantizer = Quantizer(dataclasses.replace(layer.input_quantizer.cfg, bits=16))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(reloaded, loaded.net, tokens(3)) < ATOL
    assert transformers.AutoTokenizer.from_pretrained(out)("abc").input_ids == loaded.tokenizer.encode("abc")
