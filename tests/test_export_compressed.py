"""scripts/export_compressed.py: compressed-tensors W4A16 / W8A16 checkpoints (what vLLM serves),
exact to training's weights, and loaded by transformers with the compressed-tensors package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, refused

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from qat.hf.compressed_export import codes_and_steps, export_compressed  # noqa: E402
from qat.hf.export import quantized_weight  # noqa: E402
from qat.train.checkpoint import load_trained, write_model_checkpoint  # noqa: E402
from qat.train.lifecycle import build_net  # noqa: E402

MODEL = ["model=debug-xs", "model.n_kv_head=1"]  # d 128, ffn 384, 2 heads of 64 (RoPE row order matters)
PRESETS = {"ct_w4a16_g128": (4, 128), "ct_w8a16": (8, None)}


def make_checkpoint(path: Path, *overrides: str, seed: int = 0) -> Path:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=[*MODEL, *overrides]), resolve=True)
    net = build_net(cfg, instantiate(OmegaConf.create(cfg["tokenizer"])).vocab_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # std 0.1 weights: peaked attention, so a wrong row order shows
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 if p.dim() == 2 else 0.5 + torch.rand(p.shape, generator=g))
    return write_model_checkpoint(path, net, cfg, step=3)


@pytest.fixture(scope="module", params=list(PRESETS))
def exported(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(root / "model.ckpt", f"quant={request.param}")
    assert export_compressed(ckpt, root / "ct") == {"bits": PRESETS[request.param][0], "group": PRESETS[request.param][1], "layers": 7}
    return request.param, ckpt, root / "ct"


def test_the_file_holds_trainings_codes_and_steps(exported):
    preset, ckpt, out = exported
    bits, group = PRESETS[preset]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (bits, group, True)
    assert weights["strategy"] == ("group" if group else "channel")
    tensors = load_file(str(out / "model.safetensors"))
    net = load_trained(ckpt).net
    codes, steps = codes_and_steps(net)
    assert len(codes) == 7  # debug-xs: one block
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for name, k in codes.items():
        packed, d = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert f"{name}.weight" not in tensors and packed.dtype == torch.int32
        assert tensors[f"{name}.weight_shape"].tolist() == list(k.shape)
        assert d.shape == (k.shape[0], k.shape[1] // group if group else 1)
        unpacked = unpack_from_int32(packed, bits, torch.Size(k.shape))
        assert torch.equal(unpacked, k) and unpacked.abs().max() <= 2 ** (bits - 1) - 1  # -2^(b-1) never used
    # q_proj in Hugging Face's row order: its decoded weight is export_hf's quantized q_proj
    q = codes["model.layers.0.self_attn.q_proj"].float()
    d = steps["model.layers.0.self_attn.q_proj"]
    ours = quantized_weight("layers.0.attn.qkv", net.layers[0].attn.qkv)[: q.shape[0]]
    from qat.hf.convert import interleaved_to_halves

    hf = interleaved_to_halves(ours, 2, 64)
    assert torch.equal((q.reshape(q.shape[0], d.shape[1], -1) * d[..., None]).reshape(q.shape), hf)


def test_transformers_with_compressed_tensors_computes_our_model(exported):
    """transformers decompresses the packed weights on the CPU (fp32): the logits are our
    fake-quant model's within fp32 summation error (measured below 1e-5 of the max)."""
    _, ckpt, out = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    net = load_trained(ckpt).net
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = model(ids).logits, net(ids)
    assert (theirs - ours).abs().max() < 1e-5 * ours.abs().max()


@pytest.mark.slow  # subprocesses or compilation: out of the quick loop, in CI's suite
def test_cli_from_elsewhere_and_one_line_refusals(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from export_compressed import main
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    good = make_checkpoint(tmp_path / "w8.ckpt", "quant=ct_w8a16")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_compressed.py"), "--ckpt", str(good), "--out", "ct"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "W8A16, one scale per channel, 7 layers" in proc.stdout, proc.stderr[-2000:]
    assert "exists and is not empty" in refused(capsys, main, "--ckpt", str(good), "--out", str(tmp_path / "ct"))
    for overrides, expected in (
        (["quant=quest"], "layer layers.0.attn.qkv: activation bits=4 (vLLM computes 16-bit activations; need 16); weight rotation='hadamard'"),
        (["quant=ct_w4a16_g128", "quant.weight.scale_dtype=float32"], "weight scale_dtype='float32'"),
        (["quant=bf16"], "an unquantized weight"),
        (["quant=ct_w4a16_g128", "quant.weight.grid=int"], "weight grid='int'"),
    ):
        bad = make_checkpoint(tmp_path / "bad.ckpt", *overrides)
        assert expected in refused(capsys, main, "--ckpt", str(bad), "--out", str(tmp_path / "bad"))
        assert not (tmp_path / "bad").exists()
