"""The packed directory itself: config.json, exact on-disk sizes, decoding without our code,
tokenizers, nothing half-written, one-line errors (library and CLI), and (slow) a train.py
run exported by the CLI and compared with the checkpoint's fake-quant model."""

import dataclasses
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qat.data.tokenizer import ByteTokenizer, HFTokenizer
from qat.packed.export import export_checkpoint, export_packed
from qat.packed.format import FORMAT_VERSION
from qat.packed.load import load_packed
from qat.packed.packing import packed_bytes
from test_packed import RUN_CONFIG, assert_float32_parity, build_fake_quant, reference_codes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add contention

ROOT = Path(__file__).resolve().parents[1]
W4 = {"bits": 4}


def read_safetensors(path: Path) -> tuple[dict, int]:
    """The header ({name: {dtype, shape, data_offsets}}) and where the data starts, per the spec."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, 8 + n


def cli(*args: str) -> int:
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_config_json_and_round_trip(tmp_path):
    fake = build_fake_quant({"bits": 3}, {"bits": 3, "grid": "gaussian"})
    out = export_packed(fake, ByteTokenizer(), RUN_CONFIG, 7, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION == 1
    assert config["model"] == dataclasses.asdict(fake.cfg)
    assert config["tokenizer"] == {"type": "bytes"}
    assert config["trained"] == {"run_config": RUN_CONFIG, "step": 7}
    layer = fake.layers[0].mlp.down
    entry = config["layers"]["layers.0.mlp.down"]
    assert list(config["layers"]) == [f"layers.0.{m}" for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")]
    assert entry["weight"] == layer.weight_quantizer.cfg.to_dict() and entry["activation"] == layer.input_quantizer.cfg.to_dict()
    assert (entry["in_features"], entry["out_features"], entry["bias"], entry["weight_dtype"]) == (384, 128, False, "float64")
    assert entry["weight_grid"] == {"n_levels": 8, "center": 3.5, "gaussian_scale": layer.weight_quantizer.grid.gaussian_scale}
    assert entry["input_grid"]["center"] is None
    model = load_packed(out)
    assert (model.config, model.step, type(model.tokenizer)) == (RUN_CONFIG, 7, ByteTokenizer)
    assert not any(p.requires_grad for p in model.net.parameters()) and not model.net.training


@pytest.mark.parametrize("bits, sparse", [(1, False), (1.58, False), (2, False), (3, False), (4, False), (8, False), (3, True), (1.58, True)])
def test_on_disk_sizes_are_exact(bits, sparse, tmp_path):
    weight = {"bits": bits, "sparsity": "2:4" if sparse else "none"}
    fake = build_fake_quant(weight, W4, dtype=torch.float32)
    out = export_packed(fake, ByteTokenizer(), RUN_CONFIG, 7, tmp_path / "m")
    header, data_start = read_safetensors(out / "model.safetensors")
    sizes = {name: t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items()}
    assert (out / "model.safetensors").stat().st_size == data_start + sum(sizes.values())
    for name, m in fake.named_modules():
        if not hasattr(m, "weight_quantizer"):
            continue
        n, k = m.weight.shape
        kept = k // 2 if sparse else k
        codes = header[f"{name}.weight_codes"]
        assert (codes["dtype"], codes["shape"]) == ("U8", [n, packed_bytes(kept, bits)])
        assert sizes[f"{name}.weight_codes"] == n * packed_bytes(kept, bits)
        assert (header[f"{name}.weight_scale"]["dtype"], header[f"{name}.weight_scale"]["shape"]) == ("F32", [n, 1])
        assert (f"{name}.weight_positions" in header) == sparse and f"{name}.weight" not in header
        if sparse:
            assert sizes[f"{name}.weight_positions"] == n * k // 8  # two 2-bit indices per 4 columns
        bf16_bytes = n * k * 2
        if bits == 3 and not sparse:
            assert sizes[f"{name}.weight_codes"] * 16 == 3 * bf16_bytes
        if bits == 1.58 and not sparse:
            assert sizes[f"{name}.weight_codes"] * 16 <= 2 * bf16_bytes
    assert header["embed.weight"]["dtype"] == "F32" and header["lm_head.weight"]["shape"] == [257, 128]


def test_a_reader_decodes_weights_from_the_docstring_alone(tmp_path):
    """4-bit int, row scales: nibbles low first, value = (code - 7.5) * (s / 7.5)."""
    fake = build_fake_quant(W4, W4, dtype=torch.float32)
    out = export_packed(fake, ByteTokenizer(), RUN_CONFIG, 7, tmp_path / "m")
    header, start = read_safetensors(out / "model.safetensors")
    raw = (out / "model.safetensors").read_bytes()

    def tensor(name, dtype):
        a, b = header[name]["data_offsets"]
        return np.frombuffer(raw[start + a : start + b], dtype=dtype).reshape(header[name]["shape"])

    packed = tensor("layers.0.attn.qkv.weight_codes", np.uint8)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    scale = tensor("layers.0.attn.qkv.weight_scale", np.float32)
    values = (codes.astype(np.float32) - 7.5) * (scale / np.float32(7.5))
    layer = fake.layers[0].attn.qkv
    assert np.array_equal(codes, reference_codes(layer)[0].numpy())
    assert np.array_equal(values, layer.weight_quantizer(layer.weight).detach().numpy())


def test_hf_tokenizer_travels_with_the_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("the cow sees two hens farm".split())}}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tok.json"))
    tok = HFTokenizer(str(tmp_path / "tok.json"))
    fake = build_fake_quant(W4, W4, vocab_size=tok.vocab_size)
    out = export_packed(fake, tok, RUN_CONFIG, 3, tmp_path / "m")
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["tokenizer"] == {"type": "hf", "file": "tokenizer.json", "eos_token": "<|endoftext|>", "bos_token": None}
    (tmp_path / "tok.json").unlink()  # the export is self-contained
    loaded = load_packed(out).tokenizer
    assert loaded.encode("the cow sees two hens") == tok.encode("the cow sees two hens") and loaded.eos_id == 0
    # A pretrained model's begin-of-text token travels too (it was dropped: every text lost its first id).
    with_bos = HFTokenizer(str(out / "tokenizer.json"), bos_token="the")
    loaded = load_packed(export_packed(fake, with_bos, RUN_CONFIG, 3, tmp_path / "bos")).tokenizer
    assert loaded.bos_id == with_bos.bos_id and loaded.encode("two hens") == with_bos.encode("two hens") == [2, 5, 6]


def test_existing_output_needs_force_and_is_replaced_only_when_complete(tmp_path, monkeypatch):
    fake = build_fake_quant(W4, W4)
    out = tmp_path / "m"
    out.mkdir()  # an empty directory is fine without --force
    export_packed(fake, ByteTokenizer(), RUN_CONFIG, 1, out)
    with pytest.raises(ValueError, match="exists and is not empty; pass --force") as err:
        export_packed(fake, ByteTokenizer(), RUN_CONFIG, 2, out)
    assert "\n" not in str(err.value)
    # A failure while writing leaves the old export untouched and no temp directory behind.
    import qat.packed.export as export_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "safetensors_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        export_packed(fake, ByteTokenizer(), RUN_CONFIG, 2, out, force=True)
    monkeypatch.undo()
    assert load_packed(out).step == 1 and [p.name for p in tmp_path.iterdir()] == ["m"]
    export_packed(fake, ByteTokenizer(), RUN_CONFIG, 2, out, force=True)
    assert load_packed(out).step == 2 and [p.name for p in tmp_path.iterdir()] == ["m"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_packed(fake, ByteTokenizer(), RUN_CONFIG, 2, tmp_path / "f", force=True)


def test_export_refuses_an_uninitialised_learned_scale(tmp_path):
    from qat.models.llama import Llama
    from qat.models.sizes import llama_config
    from qat.quant.convert import quantize_model

    net = Llama(llama_config("debug-xs", vocab_size=257))
    lsq = {"bits": 4, "rotation": "none", "scale": "lsq", "estimator": "lsq"}
    quantize_model(net, {"bits": 4, "rotation": "none"}, lsq)
    with pytest.raises(ValueError, match="layers.0.attn.qkv activation: the learned scale was never initialised"):
        export_packed(net, ByteTokenizer(), RUN_CONFIG, 0, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "zip.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    return {
        "missing": (tmp_path / "absent.ckpt", "does not exist"),
        # Whichever layer catches these (the checkpoint reader or export), the message names the file.
        "random bytes": (tmp_path / "random.ckpt", "checkpoint"),
        "text": (tmp_path / "text.ckpt", "checkpoint"),
        "truncated": (truncated, "checkpoint"),
        "not from train.py": (good, "checkpoint"),
    }


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    for case, (path, message) in _bad_checkpoints(tmp_path).items():
        with pytest.raises(ValueError, match=message) as err:
            export_checkpoint(path, tmp_path / "out")
        assert "\n" not in str(err.value) and str(path) in str(err.value), case
        assert cli("--ckpt", str(path), "--out", str(tmp_path / "out")) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, (case, stderr)
    assert not (tmp_path / "out").exists()


def test_bad_packed_directories_are_one_line_errors(tmp_path):
    out = export_packed(build_fake_quant({"bits": 8, "grid": "int_zero"}, W4), ByteTokenizer(), RUN_CONFIG, 7, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    with pytest.raises(ValueError, match="is not a packed model directory"):
        load_packed(tmp_path)
    (out / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version=2 is not supported"):
        load_packed(out)
    (out / "config.json").write_text(json.dumps(config))
    # int_zero at 8 bits has codes 0..254: a 255 is corruption, caught by name.
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    tensors["layers.0.attn.proj.weight_codes"][0, 0] = 255
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ValueError, match="layers.0.attn.proj.weight_codes holds code 255"):
        load_packed(out)
    del tensors["layers.0.attn.proj.weight_scale"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ValueError, match="does not match config.json.*layers.0.attn.proj.weight_scale"):
        load_packed(out)
    (out / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        load_packed(out)


@pytest.mark.slow
@torch.no_grad()
def test_train_export_load_end_to_end(tmp_path):
    from qat.train.checkpoint import load_trained

    run = tmp_path / "run"
    train = [
        sys.executable, str(ROOT / "train.py"), "trainer.max_steps=5", "trainer.val_check_interval=5", "data.batch_size=8",
        "data.val_batches=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}",
    ]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    export = [sys.executable, str(ROOT / "scripts" / "export.py"), "--ckpt", str(ckpt), "--out", str(tmp_path / "packed")]
    proc = subprocess.run(export, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The CLI's own error path: an existing export without --force, then random bytes.
    again = subprocess.run(export, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and again.stderr.count("\n") == 1
    (tmp_path / "random.ckpt").write_bytes(np.random.default_rng(1).bytes(2048))
    bad = subprocess.run([*export[:3], str(tmp_path / "random.ckpt"), "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1

    trained, packed = load_trained(ckpt), load_packed(tmp_path / "packed")
    assert (packed.step, packed.config) == (trained.step, trained.config)
    assert_float32_parity(trained.net, packed.net, torch.tensor([trained.tokenizer.encode("farm: the cow")]))
