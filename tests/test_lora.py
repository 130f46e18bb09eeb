"""QAT with low-rank adapters (`lora=default`, qat/train/lora.py).

In-process and fast, on debug-xs with every deployment preset: step 0 is the base exactly; the
merged model's fake-quant forward equals the LoRA model's training forward (the same codes, the
same float64 logits); the gradient reaches A and B through the weight quantizer's estimator
(against a hand-applied chain rule); the eval weight cache follows A and B; the base stays
bitwise frozen under AdamW with weight decay; checkpoints hold only the adapters and the base's
identity, and another or a missing base is refused; every exporter takes a LoRA checkpoint and
writes what it writes for the merged one; bad config values fail in one line before any work.

End to end (slow), as a user runs train.py on a tiny save_pretrained Llama built here (nothing
is downloaded): resume equals an uninterrupted run, DDP and FSDP match one process, init_from a
GPTQ checkpoint with compile, and the recipe command with distill=kd exported to GGUF, whose
greedy tokens in llama.cpp (when installed) are generate.py's.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import DDP_TOLERANCE, FLOAT64, ROOT, refused, run_train
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qat.quant.config import QuantizerConfig
from qat.quant.linear import QuantLinear
from qat.quant.low_rank import LowRankDelta
from qat.quant.quantizer import fake_quantize, rotate
from qat.train.checkpoint import load_initial_weights, load_trained, merge_lora_checkpoint, write_model_checkpoint
from qat.train.identity import model_identity
from qat.train.lifecycle import build_net
from qat.train.lora import ADAPTER_STATE, LoraConfig, add_adapters, merge_adapters
from qat.train.optim import build_optimizer
from qat.train.run_config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: more threads only contend on a shared machine
# W4A4 QuEST, the deployment formats, a learned scale (LSQ's scalar; learned per-group weight scales)
PRESETS = ["quest", "gguf_q4_0", "gguf_q4_1", "ct_w4a16_g128", "lsq", "gguf_q4_0 quant.weight.scale_update=learned"]


def run_config(*overrides: str) -> dict:
    overrides = tuple(word for o in overrides for word in o.split())  # a preset may carry its own overrides
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=["model=debug-xs", *overrides]), resolve=True)


def vocab(cfg: dict) -> int:
    return instantiate(OmegaConf.create(cfg["tokenizer"])).vocab_size


def layers(net: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in net.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def randomize_adapters(net: torch.nn.Module, seed: int = 0) -> None:
    """B away from its zero init: the delta is the size of the weights, so codes change."""
    g = torch.Generator().manual_seed(seed)
    for layer in layers(net).values():
        layer.lora.b.copy_(torch.randn(layer.lora.b.shape, generator=g, dtype=layer.lora.b.dtype) * 0.05)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(seed))


def lora_model(preset: str, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the base, quantized as the preset says; the same model with random adapters), debug-xs."""
    cfg = run_config(f"quant={preset}", "lora=default")
    torch.manual_seed(0)
    base = build_net(cfg, vocab(cfg)).to(dtype)
    net = copy.deepcopy(base)
    add_adapters(net, LoraConfig.from_mapping(cfg["lora"]))
    return base, net


def codes(layer: QuantLinear, weight: torch.Tensor) -> torch.Tensor:
    q = layer.weight_quantizer
    return fake_quantize(weight.detach(), q.cfg, q.grid, q.held_scale(weight)).codes


# ---------------------------------------------------------------- config: one line, before any work


@pytest.mark.parametrize(
    "values, says",
    [
        ({"rank": 0}, "lora.rank=0 must be an integer >= 1"),
        ({"rank": 1.5}, "lora.rank=1.5 must be an integer >= 1"),
        ({"rank": True}, "lora.rank=True must be an integer"),
        ({"alpha": 0}, "lora.alpha=0 must be a number > 0, or null"),
        ({"dropout": 1.0}, "lora.dropout=1.0 must be a number in [0, 1)"),
        ({"target": []}, "lora.target=[] must be a glob or a non-empty list"),
        ({"name": "qlora"}, "lora.name='qlora' is not allowed; choose one of 'none', 'lora'"),
        ({"name": "none", "rank": 8}, "lora.rank / alpha / dropout / target / lr are ignored with lora=none"),
        ({"lr": 0}, "lora.lr=0 must be a number > 0, or null for optimizer.lr"),
        ({"lr": "fast"}, "lora.lr='fast' must be a number > 0"),
        ({"ranks": 8}, "lora.ranks is not a key"),
    ],
)
def test_bad_values_name_the_value_and_what_is_allowed(values, says):
    with pytest.raises(ValueError, match="^" + re.escape(says)):
        LoraConfig.from_mapping({"name": "lora", **values})


def test_defaults_and_the_scale():
    cfg = LoraConfig.from_mapping(run_config("lora=default")["lora"])
    assert (cfg.enabled, cfg.rank, cfg.resolved_alpha, cfg.scale, cfg.dropout, cfg.target, cfg.lr) == (True, 16, 32.0, 2.0, 0.0, ("*",), 1e-3)
    assert LoraConfig.from_mapping({"name": "lora", "rank": 64}).scale == 2.0  # alpha null follows the rank
    assert LoraConfig.from_mapping({"name": "lora", "rank": 8, "alpha": 8}).scale == 1.0
    assert LoraConfig.from_mapping({"name": "lora", "target": "layers.*.attn.*"}).target == ("layers.*.attn.*",)
    assert not LoraConfig.from_mapping(run_config()["lora"]).enabled and not LoraConfig.from_mapping(None).enabled


def test_targets_and_rank_are_checked_against_the_layers():
    cfg = run_config("lora=default")
    net = build_net(cfg, 257, device="meta")
    chosen = add_adapters(net, LoraConfig(name="lora", target=("layers.*.attn.*", "layers.0.mlp.down")))
    assert chosen == ["layers.0.attn.qkv", "layers.0.attn.proj", "layers.0.mlp.down"]
    with pytest.raises(ValueError, match=r"^lora.target\[1\]='layers.\*.mlp.fc9' matches no quantized layer; the layers are layers.0.attn.qkv"):
        add_adapters(net, LoraConfig(name="lora", target=("*", "layers.*.mlp.fc9")))
    with pytest.raises(ValueError, match=r"^lora.rank=129 is larger than min\(in, out\)=128 of layer layers.0.attn.qkv; allowed: 1 to 128"):
        add_adapters(net, LoraConfig(name="lora", rank=129))
    assert len(add_adapters(net, LoraConfig(name="lora", rank=128))) == 5


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A debug-xs checkpoint (gguf_q4_0) as a pretrained base for init_from= (no transformers needed)."""
    cfg = run_config("quant=gguf_q4_0")
    torch.manual_seed(1)
    return write_model_checkpoint(tmp_path_factory.mktemp("base") / "base.ckpt", build_net(cfg, vocab(cfg)), cfg, step=3)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (("model=debug-xs",), "lora needs a pretrained base to adapt, and model.size='debug-xs' is trained from scratch"),
        (("INIT", "lora.rank=129"), "lora.rank=129 is larger than min(in, out)=128 of layer layers.0.attn.qkv; allowed: 1 to 128"),
        (("INIT", "lora.rank=1.5"), "lora.rank=1.5 must be an integer >= 1"),
        (("INIT", "lora.target=[layers.*.mlp.fc9]"), "lora.target[0]='layers.*.mlp.fc9' matches no quantized layer"),
        (("INIT", "telemetry.grad_alignment_every=5"), "not supported with lora"),
    ],
    ids=["from_scratch", "rank_too_large", "rank_not_integer", "unmatched_glob", "grad_alignment"],
)
def test_train_refuses_before_any_work(overrides, says, base_checkpoint, tmp_path):
    from train import train

    overrides = [f"init_from={base_checkpoint}" if o == "INIT" else o for o in overrides]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model=debug-xs", "quant=gguf_q4_0", "lora=default", f"data.cache_dir={tmp_path}/cache", *overrides])
    with pytest.raises(ConfigError) as err:
        train(cfg, tmp_path / "run")
    assert says in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # no data, no checkpoint


# ---------------------------------------------------------------- what trains is what is deployed


@pytest.mark.parametrize("preset", PRESETS)
def test_step_0_is_the_base_and_only_adapters_and_scales_train(preset):
    base, net = lora_model(preset)
    with torch.no_grad():
        assert torch.equal(net(tokens()), base(tokens()))  # B = 0: W + 0 is W
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora." in n}
    assert len(adapters) == 2 * 5 and all(n.endswith((".lora.a", ".lora.b")) for n in adapters)
    scales = trainable - adapters
    learned = preset == "lsq" or "learned" in preset
    assert scales == ({n for n, _ in net.named_parameters() if n.endswith("_quantizer.scale")} if learned else set())
    assert not learned or len(scales) >= 5
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in base.named_parameters()} - scales  # every weight, embedding, norm and the head


@pytest.mark.parametrize("preset", PRESETS)
def test_merged_model_computes_the_lora_training_forward(preset):
    """float64: each layer's codes of the merged weight are those training rounds, and the merged
    model's (cached, estimator-free) eval forward gives training's logits to 1e-12 (measured: 0)."""
    base, net = lora_model(preset)
    randomize_adapters(net)
    net.train()
    trained = net(tokens())  # LSQ: the first training forward initialises the scales
    merged = copy.deepcopy(net)
    assert len(merge_adapters(merged)) == 5 and not any(m.lora for m in layers(merged).values())
    assert all(p.requires_grad for p in merged.parameters())  # an ordinary model again
    for name, layer in layers(net).items():
        merged_layer = layers(merged)[name]
        assert torch.equal(merged_layer.weight, layer.latent_weight().detach())
        assert merged_layer.weight_quantizer.cfg == layer.weight_quantizer.cfg
        ours, theirs = codes(layer, layer.latent_weight()), codes(merged_layer, merged_layer.weight)
        if ours is not None:
            assert torch.equal(ours, theirs), name
            assert not torch.equal(ours, codes(layers(base)[name], layers(base)[name].weight))  # the adapters matter
    with torch.no_grad():
        deployed = merged.eval()(tokens())
    assert (deployed - trained.detach()).abs().max().item() <= 1e-12


def adapted_layer(preset: str, out_features: int) -> tuple[QuantLinear, QuantizerConfig]:
    """(a float64 QuantLinear [out, 128] of the preset with a frozen random weight and a rank-4
    adapter whose B is random, its weight quantizer's config); seeded."""
    torch.manual_seed(0)
    cfg = run_config(f"quant={preset}")
    w, a = (QuantizerConfig.from_mapping(cfg["quant"][s]) for s in ("weight", "activation"))
    layer = QuantLinear(128, out_features, bias=False, weight_config=w, input_config=a).double()
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
    layer.weight.requires_grad_(False)
    layer.lora = LowRankDelta(128, out_features, rank=4, alpha=8, dtype=torch.float64)
    with torch.no_grad():
        layer.lora.b.normal_(0, 0.05)
    return layer, w


@pytest.mark.parametrize("preset", ["quest", "lsq"])
def test_the_gradient_reaches_a_and_b_through_the_weight_estimator(preset):
    """autograd's dA, dB equal the chain rule by hand: G = dL/dM through the weight quantizer at
    M = W + s B A (a leaf), then dA = s B^T G and dB = s G A^T. G is the estimator's (trust, LSQ;
    both zero the clipped weights' gradient): it differs from that of the unquantized product."""
    layer, w = adapted_layer(preset, 96)
    x, g = torch.randn(6, 128, dtype=torch.float64), torch.randn(6, 96, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    m = layer.latent_weight().detach().requires_grad_()
    xq = layer.input_quantizer(x)
    (grad,) = torch.autograd.grad((F.linear(xq, layer.weight_quantizer(m)) * g).sum(), m)
    (plain,) = torch.autograd.grad((F.linear(xq, rotate(m, w)) * g).sum(), m)  # the same basis, unrounded
    lora, s = layer.lora, layer.lora.scale
    torch.testing.assert_close(lora.a.grad, s * lora.b.detach().T @ grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lora.b.grad, s * grad @ lora.a.detach().T, rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None and not torch.allclose(grad, plain)


@pytest.mark.parametrize("preset", PRESETS)
def test_recomputing_the_merged_weight_in_backward_changes_nothing_but_memory(preset, monkeypatch):
    """A LoRA layer's training step keeps only its input for the backward and quantizes the merged
    weight again there: the same output (bitwise) and gradients of A, B and the learned scale
    (float64, 1e-12) as autograd keeping the weight, and between forward and backward it holds
    less than the one weight-sized tensor that F.linear alone keeps."""
    from qat.inference.compare import memory_profile

    def step(layer: QuantLinear, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        layer.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_()  # inside a network: earlier adapters make the input trainable
        with memory_profile() as prof:
            y = layer(x)
        held = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]") - y.numel() * y.element_size()
        (y * g).sum().backward()
        return y.detach(), [x.grad, *(p.grad for p in layer.parameters() if p.requires_grad)], held

    layer, _ = adapted_layer(preset, 384)
    x, g = torch.randn(4, 128, dtype=torch.float64), torch.randn(4, 384, dtype=torch.float64)
    assert layer._recompute_weight()
    y, grads, held = step(layer, x, g)
    monkeypatch.setattr(QuantLinear, "_recompute_weight", lambda self: False)
    y_kept, grads_kept, held_kept = step(layer, x, g)
    assert torch.equal(y, y_kept) and len(grads) == len(grads_kept) >= 3
    for grad, kept in zip(grads, grads_kept):
        torch.testing.assert_close(grad, kept, rtol=1e-12, atol=1e-15)
    weight_bytes = layer.weight.numel() * 8
    assert held < 0.25 * weight_bytes <= weight_bytes <= held_kept, (held, held_kept)


def test_the_eval_weight_cache_follows_the_adapters():
    _, net = lora_model("quest", torch.float32)
    layer = net.layers[0].mlp.up
    optimizer = torch.optim.AdamW(layer.lora.parameters(), lr=1e-2)
    net.eval()
    with torch.no_grad():
        first = layer.quantized_weight()
        assert layer.quantized_weight() is first  # cached
    for _ in range(2):  # the first step moves B (from 0: dA = s B^T G = 0), the second A and B
        (layer.latent_weight() * torch.randn(96 * 4, 128)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            now = layer.quantized_weight()
            assert not torch.equal(now, first) and torch.equal(now, layer.weight_quantizer(layer.latent_weight()))
        first = now
    layer.lora = LowRankDelta(128, 384, rank=2, alpha=4)  # another adapter (B = 0): the base's weight again
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight))


@pytest.mark.parametrize("preset", ["quest", "lsq"])
def test_the_base_stays_bitwise_frozen_under_adamw_with_weight_decay(preset):
    _, net = lora_model(preset, torch.float32)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not any(part in n for part in ADAPTER_STATE)}
    scales = {n: p.detach().clone() for n, p in net.named_parameters() if n.endswith("_quantizer.scale")}
    optimizer = build_optimizer(net, functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2 * 5 + len(scales)
    net.train()
    for step in range(3):
        x = tokens(step)
        F.cross_entropy(net(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(net.named_parameters())
    assert all(torch.equal(params[n], v) and params[n].grad is None for n, v in frozen.items())
    assert all(m.lora.b.abs().max() > 0 for m in layers(net).values())
    if preset == "lsq":
        assert all(not torch.equal(params[n], v) for n, v in scales.items() if "weight_quantizer" in n)


# ---------------------------------------------------------------- checkpoints, merge_lora, exporters


def lora_checkpoint(directory: Path, preset: str) -> SimpleNamespace:
    """A LoRA checkpoint as train.py writes it (init_from a base checkpoint), with random adapters."""
    directory.mkdir(parents=True, exist_ok=True)
    base_cfg = run_config(f"quant={preset}")
    torch.manual_seed(2)
    base = write_model_checkpoint(directory / "base.ckpt", build_net(base_cfg, vocab(base_cfg)), base_cfg, step=3)
    cfg = run_config(f"quant={preset}", "lora=default", f"init_from={base}")
    net = build_net(cfg, vocab(cfg))
    load_initial_weights(net, base)
    add_adapters(net, LoraConfig.from_mapping(cfg["lora"]))
    randomize_adapters(net)
    ckpt = write_model_checkpoint(directory / "lora.ckpt", net, cfg, step=5, lora_base=model_identity(base))
    return SimpleNamespace(base=base, ckpt=ckpt, net=net.eval(), cfg=cfg)


def script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_lora_checkpoint_holds_the_adapters_and_its_base_and_merges(tmp_path, capsys):
    lora = lora_checkpoint(tmp_path, "gguf_q4_0")
    saved = torch.load(lora.ckpt, weights_only=True)
    assert len(saved["state_dict"]) == 2 * 5 and all(".lora." in k for k in saved["state_dict"])
    assert saved["lora_base"] == {"path": str(lora.base), "sha256": model_identity(lora.base)["sha256"]}
    with torch.no_grad():
        expected = lora.net(tokens())
        unmerged = load_trained(lora.ckpt, merge=False)
        assert torch.equal(unmerged.net(tokens()), expected) and unmerged.config["lora"]["name"] == "lora"
        loaded = load_trained(lora.ckpt)  # what every exporter reads: merged, an ordinary model
        assert torch.equal(loaded.net(tokens()), expected) and loaded.config["lora"] == {"name": "none"}

    main = script_main("merge_lora")
    out = tmp_path / "merged.ckpt"
    assert main(["--ckpt", str(lora.ckpt), "--out", str(out)]) == 0
    merged = torch.load(out, weights_only=True)
    assert "lora_base" not in merged and merged["merged_from"]["lora_base"] == saved["lora_base"]
    assert merged["quantization"] == saved["quantization"] and merged["config"]["lora"] == {"name": "none"}
    base_state = torch.load(lora.base, weights_only=True)["state_dict"]
    for name, layer in layers(lora.net).items():
        a, b = (saved["state_dict"][f"net.{name}.lora.{p}"] for p in "ab")
        assert torch.equal(merged["state_dict"][f"net.{name}.weight"], base_state[f"net.{name}.weight"] + 2.0 * (b @ a))
    assert merged["state_dict"]["net.embed.weight"].equal(base_state["net.embed.weight"])
    with torch.no_grad():
        assert torch.equal(load_trained(out).net(tokens()), expected)

    capsys.readouterr()
    assert "holds no LoRA adapters" in refused(capsys, main, "--ckpt", str(out), "--out", str(tmp_path / "again.ckpt"))
    assert "exists; add --force" in refused(capsys, main, "--ckpt", str(lora.ckpt), "--out", str(out))
    assert main(["--ckpt", str(lora.ckpt), "--out", str(out), "--force"]) == 0
    with pytest.raises(ValueError, match="holds LoRA adapters only; merge them"):
        load_initial_weights(lora.net, lora.ckpt)

    moved = lora.base.rename(tmp_path / "moved.ckpt")
    assert "which does not exist" in refused(capsys, main, "--ckpt", str(lora.ckpt), "--out", str(tmp_path / "m2.ckpt"))
    other = torch.load(moved, weights_only=True)
    other["state_dict"]["net.layers.0.mlp.up.weight"] += 0.01
    torch.save(other, lora.base)
    line = refused(capsys, main, "--ckpt", str(lora.ckpt), "--out", str(tmp_path / "m2.ckpt"))
    assert f"adapts the base {lora.base} (sha256 {saved['lora_base']['sha256'][:12]}), not {lora.base} (sha256" in line
    assert not (tmp_path / "m2.ckpt").exists()


def export(kind: str, ckpt: Path, out: Path) -> None:
    """What scripts/export_gguf.py, export.py, export_compressed.py and export_hf.py run."""
    if kind == "gguf":
        from qat.packed.gguf_export import export_gguf

        export_gguf(ckpt, out)
    elif kind == "packed":
        from qat.packed.export import export_checkpoint

        export_checkpoint(ckpt, out)
    elif kind == "compressed":
        from qat.hf.compressed_export import export_compressed

        export_compressed(ckpt, out)
    else:
        from qat.hf.export import export_hf

        export_hf(ckpt, out, weights="quantized")


@pytest.mark.parametrize("preset, exporter", [("gguf_q4_0", "gguf"), ("gguf_q4_1", "gguf"), ("ct_w4a16_g128", "compressed"), ("quest", "packed"), ("quest", "hf")])
def test_every_exporter_takes_a_lora_checkpoint_as_its_merge(preset, exporter, tmp_path):
    """The same bytes from the LoRA checkpoint and from merge_lora.py's (the exporters' own checks
    that the files decode to training's weights run on the merged model)."""
    pytest.importorskip({"gguf": "gguf", "compressed": "compressed_tensors"}.get(exporter, "torch"))
    lora = lora_checkpoint(tmp_path, preset)
    merged = merge_lora_checkpoint(lora.ckpt, tmp_path / "merged.ckpt")
    export(exporter, lora.ckpt, tmp_path / "from_lora")
    export(exporter, merged, tmp_path / "from_merged")
    a, b = tmp_path / "from_lora", tmp_path / "from_merged"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()) if a.is_dir() else [Path()]
    assert files and files == (sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) if b.is_dir() else [Path()])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ---------------------------------------------------------------- end to end: train.py (slow)

QUEST = "quant.weight.hadamard_block=16"  # quest's full block does not fit hidden 64 and 96
RUN = (
    "lora=default", "data.seq_len=64", "trainer.max_steps=4", "trainer.val_check_interval=2",
    "checkpoint.every_n_steps=2", "telemetry.every=2", "trainer.log_every_n_steps=1", "lora.lr=3e-3",
)  # fmt: skip


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A tiny random save_pretrained Llama (2 blocks, hidden 64, GQA, sharded): the base."""
    pytest.importorskip("transformers")
    from test_hf import save_hf_llama

    directory = tmp_path_factory.mktemp("hf_base")
    save_hf_llama(directory, "gqa_sharded")
    return directory


def _run(run_dir: Path, base: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_train(run_dir, "model=hf", f"model.path={base}", *RUN, *extra, check=check)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _adapters(run_dir: Path, name: str = "last.ckpt") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)["state_dict"]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _build(tmp_path: Path, base: Path, *extra: str):
    """train.py's build() of a distilled run on `base` (no training): its parts."""
    import train

    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i} says the cow eats grass number {i}\n" for i in range(300)))
    overrides = ["model=hf", f"model.path={base}", "data=local", f"data.path={corpus}", "data.seq_len=32", "data.batch_size=2", "data.val_batches=1", "distill=kd", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return train.build(cfg, tmp_path / "run", False, overrides)


def test_lora_lr_is_the_runs_lr_and_optimizer_lr_beside_it_is_refused(hf_base, tmp_path):
    parts = _build(tmp_path / "null", hf_base, "lora=default", "lora.lr=null", "optimizer.lr=5e-4")
    assert parts.module.optimizer_factory.keywords["lr"] == 5e-4
    with pytest.raises(ConfigError, match=re.escape("optimizer.lr is ignored with lora.lr=0.001 (a LoRA run's LR); set lora.lr=")):
        _build(tmp_path / "both", hf_base, "lora=default", "optimizer.lr=5e-4")


def test_a_lora_students_teacher_is_its_frozen_base_not_a_copy(hf_base, tmp_path):
    """distill=kd with lora=... and the default teacher: the teacher holds no weights (a meta
    skeleton run on the student's frozen tensors) and computes the loaded teacher's logits
    exactly, before and after a training step; a full-QAT student, FSDP (which shards the base)
    and another teacher dtype each get their own copy."""
    from qat.train.distill import load_teacher

    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer: logging is a no-op
    parts = _build(tmp_path, hf_base, "lora=default", "quant=gguf_q4_0")
    teacher, net = parts.teacher, parts.module.net
    assert teacher.student is net and all(p.is_meta for p in teacher.net.parameters())
    reference = load_teacher(hf_base, 260, "float32")
    idx = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(teacher.logits(idx), reference(idx))
    randomize_adapters(net)  # the adapters train; the teacher is the base, not the adapted model
    loss = parts.module.training_step((idx, idx), 0)
    loss.backward()
    assert loss.item() > 0 and torch.equal(teacher.logits(idx), reference(idx))
    assert all(p.grad is not None for n, p in net.named_parameters() if ".lora." in n)

    assert parts.module.optimizer_factory.keywords["lr"] == 1e-3  # lora.lr, not experiment-free optimizer.lr
    for i, extra in enumerate(([], ["lora=default", "trainer=fsdp_cpu"], ["lora=default", "distill.teacher_dtype=bfloat16"])):
        other = _build(tmp_path / f"other{i}", hf_base, "quant=gguf_q4_0", *extra).teacher
        assert other.student is None and not any(p.is_meta for p in other.net.parameters()), extra


@pytest.mark.slow
def test_bench_lora_measures_what_the_arms_hold(hf_base, tmp_path):
    """scripts/bench_lora.py on the tiny base: the arms' parameters, teacher and optimizer state
    against their closed forms, the peak as their sum, and the projection's parameter counts
    against Llama-2-7B's (6,738,415,616; LoRA on our fused qkv and the four other linears of
    each block: r * 69,888 per block)."""
    from test_fuzz_scripts import script_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i} says the cow eats grass number {i}\n" for i in range(300)))
    argv = ["--model", str(hf_base), "--data", str(corpus), "--quant", "gguf_q4_0", "--ranks", "4", "--seq-len", "16",
            "--batch-sizes", "2", "1", "--steps", "3", "--clock", "cpu", "--out", str(tmp_path / "out")]  # fmt: skip
    assert script_main("bench_lora")(argv) == 0
    report = json.loads((tmp_path / "out" / "bench_lora.json").read_text())
    assert report["clock"] == "cpu"
    rows = {(r["arm"], r["batch_size"]): r for r in report["rows"]}
    full, lora = rows["full", 2], rows["lora r4", 2]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["model=hf", f"model.path={hf_base}", "quant=gguf_q4_0"])
    adapters = sum(4 * (m.in_features + m.out_features) for m in layers(build_net(cfg, 260, device="meta")).values())
    assert full["trainable_params"] == full["total_params"] and lora["trainable_params"] == adapters
    assert lora["model_mib"] == pytest.approx(full["model_mib"] + 4 * adapters / 2**20)
    assert lora["teacher_mib"] == 0 and full["teacher_mib"] == pytest.approx(full["model_mib"], rel=0.01)  # LoRA's teacher is its base
    for r in (full, lora):  # AdamW: two fp32 states per trained weight (and a step count per tensor)
        assert 8 * r["trainable_params"] <= r["optimizer_mib"] * 2**20 <= 8 * r["trainable_params"] + 4096
        assert r["peak_mib"] == pytest.approx(r["model_mib"] + r["teacher_mib"] + r["optimizer_mib"] + r["step_peak_mib"])
        assert r["seconds_per_step"] > 0 and rows[r["arm"], 1]["seconds_per_step"] is None
    assert rows["full", 2]["step_peak_mib"] > rows["full", 1]["step_peak_mib"]
    projected = {(p["model"], p["arm"]): p for p in report["projected"]}
    assert projected["7B", "full"]["total_params"] == projected["7B", "full"]["trainable_params"] == 6_738_415_616
    assert projected["7B", "lora r4"]["trainable_params"] == 4 * 69_888 * 32
    assert projected["70B", "lora r4"]["projected_gib"] < projected["70B", "full"]["projected_gib"]
    assert "| gguf_q4_0 | lora r4 | 2 × 16 |" in (tmp_path / "out" / "bench_lora.md").read_text()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, hf_base) -> tuple[Path, subprocess.CompletedProcess]:
    """quest W4A4 in float64 on one process: the reference of DDP below."""
    run_dir = tmp_path_factory.mktemp("lora_run")
    return run_dir, _run(run_dir, hf_base, QUEST, FLOAT64)


@pytest.mark.slow
def test_a_run_saves_its_adapters_and_base_and_deploys_its_training_forward(lora_run, hf_base):
    run_dir, proc = lora_run
    r = _results(run_dir)
    assert r["status"] == "completed" and r["step"] == 4 and "lora: rank 16, alpha 32 (scale 2), lr 0.003 on 10 layers" in proc.stdout
    assert r["lora_base"] == model_identity(hf_base)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lora_base"] == r["lora_base"] and ckpt["config"]["lora"]["name"] == "lora"
    assert len(ckpt["state_dict"]) == 2 * 10 and all(".lora." in k for k in ckpt["state_dict"])  # no base weight
    assert r["trainable_params"] == sum(v.numel() for v in ckpt["state_dict"].values())
    assert min(v.abs().max().item() for k, v in ckpt["state_dict"].items() if k.endswith(".b")) > 1e-3  # B moved off 0

    # The LoRA model's training forward (train mode, estimators on) against the merged model's
    # deployed one (eval, cached estimator-free weights): the same codes and logits.
    path = run_dir / "checkpoints" / "last.ckpt"
    lora, merged = load_trained(path, merge=False).net.train(), load_trained(path).net
    idx = torch.randint(0, 260, (2, 64), generator=torch.Generator().manual_seed(0))
    trained = lora(idx).detach()
    with torch.no_grad():
        assert torch.equal(merged(idx), trained)
    for name, layer in layers(lora).items():
        assert torch.equal(codes(layer, layer.latent_weight()), codes(layers(merged)[name], layers(merged)[name].weight)), name


@pytest.mark.slow
def test_a_resumed_run_has_the_uninterrupted_runs_adapters_bit_for_bit(hf_base, tmp_path):
    # float32: with trainer.precision=64-true Lightning restores a checkpoint into the module
    # before converting it to float64, so any resumed float64 state passes through float32.
    run_dir, cut = tmp_path / "whole", tmp_path / "cut"
    _run(run_dir, hf_base, QUEST)
    shutil.copytree(run_dir, cut)
    for name in ("last.ckpt", "step0000004.ckpt"):
        (cut / "checkpoints" / name).unlink(missing_ok=True)
    proc = _run(cut, hf_base, QUEST)
    assert "resumed from step 2" in proc.stdout
    whole, again = _adapters(run_dir), _adapters(cut)
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


@pytest.mark.slow
def test_another_base_is_refused_naming_both(lora_run, hf_base, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir, _ = lora_run
    other = tmp_path / "other-base"
    shutil.copytree(hf_base, other)
    shard = sorted(other.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    tensors = {k: v + 0.01 for k, v in tensors.items()}
    save_file(tensors, shard, metadata={"format": "pt"})
    before = (run_dir / "results.json").read_text()
    proc = _run(run_dir, other, QUEST, FLOAT64, "trainer.max_steps=6", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"adapts the base {hf_base} (sha256" in line and f"not {other} (sha256" in line
    assert "Traceback" not in proc.stderr and (run_dir / "results.json").read_text() == before


@pytest.mark.slow
def test_a_bad_rank_exits_2_in_one_line_before_any_work(hf_base, tmp_path):
    proc = _run(tmp_path, hf_base, QUEST, "lora.rank=65", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-2000:]
    assert "lora.rank=65 is larger than min(in, out)=64" in errors[0] and "allowed: 1 to 64" in errors[0]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_ddp_matches_one_process(lora_run, hf_base, tmp_path):
    run_dir, _ = lora_run
    _run(tmp_path, hf_base, QUEST, FLOAT64, "trainer=ddp_cpu")
    one, two = _results(run_dir), _results(tmp_path)
    assert two["tokens"] == one["tokens"] and abs(two["val_loss"] - one["val_loss"]) < DDP_TOLERANCE, (two["val_loss"], one["val_loss"])
    assert _max_difference(_adapters(run_dir), _adapters(tmp_path)) < 1e-9


@pytest.mark.slow
def test_fsdp_matches_ddp_with_q4_1(hf_base, tmp_path):
    # Lightning's FSDP refuses float64: float32 on the same two ranks, within 1e-4.
    # With distill=kd: DDP's teacher computes with the student's frozen base, FSDP's is a copy.
    _run(tmp_path / "ddp", hf_base, "quant=gguf_q4_1", "distill=kd", "trainer=ddp_cpu")
    _run(tmp_path / "fsdp", hf_base, "quant=gguf_q4_1", "distill=kd", "trainer=fsdp_cpu")
    ddp, fsdp = _results(tmp_path / "ddp"), _results(tmp_path / "fsdp")
    assert fsdp["tokens"] == ddp["tokens"] and abs(fsdp["val_loss"] - ddp["val_loss"]) < 1e-4, (fsdp["val_loss"], ddp["val_loss"])
    assert _max_difference(_adapters(tmp_path / "ddp"), _adapters(tmp_path / "fsdp")) < 1e-4  # FSDP gathers, then keeps adapters only


@pytest.mark.slow
def test_init_from_a_gptq_checkpoint_compiled(hf_base, tmp_path):
    """The base is scripts/ptq.py's GPTQ checkpoint (its own error-compensated weights, not
    model.path's): its path and hash are the identity, the merge adds to its weights, and
    export_compressed.py takes the LoRA checkpoint directly."""
    quant = ["quant=ct_w4a16_g128", "quant.weight.granularity=32"]  # hidden 64: groups of 32
    data = ["data=synthetic", "data.seq_len=32", "data.batch_size=4", "data.source.num_documents=200", "data.source.num_val_documents=20"]
    gptq = tmp_path / "gptq.ckpt"
    ptq = [sys.executable, str(ROOT / "scripts" / "ptq.py"), "--model", str(hf_base), "--method", "gptq", "--calibration-batches", "2", "--out", str(gptq)]
    proc = subprocess.run([*ptq, *quant, *data], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = _run(run_dir, hf_base, *quant, f"init_from={gptq}", "compile=true", "trainer.max_steps=2")
    r = _results(run_dir)
    assert r["lora_base"] == model_identity(gptq) and r["lora_base"]["path"] == str(gptq.resolve()) and r["init_from"]["ptq"] == "gptq"
    assert f"initial weights from {gptq.resolve()}" in proc.stdout

    saved, base = _adapters(run_dir), torch.load(gptq, weights_only=True)["state_dict"]
    merged = load_trained(run_dir / "checkpoints" / "last.ckpt").net.state_dict()
    for key in ("layers.0.attn.qkv", "layers.1.mlp.down"):
        a, b = saved[f"net.{key}.lora.a"], saved[f"net.{key}.lora.b"]
        assert torch.equal(merged[f"{key}.weight"], base[f"net.{key}.weight"] + 2.0 * (b @ a))
    from qat.hf.compressed_export import export_compressed

    assert export_compressed(run_dir / "checkpoints" / "last.ckpt", tmp_path / "ct")["layers"] == 2 * 7


# ---------------------------------------------------------------- the recipe, in GGUF and llama.cpp


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> SimpleNamespace:
    """A base whose next tokens are confident (so that llama.cpp's 8-bit activations cannot flip a
    greedy choice): debug-xs trained 40 steps on one repeated sentence, exported as a
    save_pretrained directory. Then the recipe command, as given, then export_gguf.py."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("recipe")
    corpus = root / "corpus.txt"
    corpus.write_text("the cow eats green grass in the field by the farm\n" * 3000)
    local = ["data=local", f"data.path={corpus}", "data.seq_len=64", "telemetry.every=0"]
    run_train(root / "pre", "model=debug-xs", "model.n_kv_head=1", "quant=bf16", *local, "optimizer.lr=3e-3", "trainer.max_steps=40", "trainer.val_check_interval=40", "checkpoint.every_n_steps=40")
    script = lambda name, *args: subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=root, capture_output=True, text=True, timeout=600)  # noqa: E731
    assert script("export_hf.py", "--ckpt", str(root / "pre" / "checkpoints" / "last.ckpt"), "--out", str(root / "base")).returncode == 0
    run = root / "run"
    proc = run_train(
        run, "experiment=qat_finetune", f"model.path={root / 'base'}", f"data.path={corpus}", "quant=gguf_q4_0", "distill=kd", "lora=default",
        "trainer=cpu", "trainer.max_steps=2", "data.seq_len=64", "data.batch_size=4", "trainer.accumulate_grad_batches=1",
    )  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    export = script("export_gguf.py", "--ckpt", str(ckpt), "--out", str(root / "model.gguf"))
    return SimpleNamespace(run=run, ckpt=ckpt, proc=proc, export=export, gguf=root / "model.gguf")


@pytest.mark.slow
def test_the_recipe_command_needs_no_other_flag_and_exports_to_gguf(recipe):
    """experiment=qat_finetune model.path=DIR quant=gguf_q4_0 distill=kd lora=default (trainer=cpu
    here: the experiment targets a GPU): the teacher is the unadapted 16-bit base."""
    r = _results(recipe.run)
    assert r["status"] == "completed" and r["val_kl"] >= 0 and r["distill_teacher"] == r["lora_base"]
    assert "4-bit none absmax int_zero trust g32" in recipe.proc.stdout and "lora: rank 16" in recipe.proc.stdout
    assert recipe.export.returncode == 0, recipe.export.stderr[-3000:]
    assert "every quantized tensor decodes to training's weights exactly" in recipe.export.stdout


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_generates_generate_pys_greedy_tokens(recipe):
    from test_export_gguf import llama_cpp_model

    from qat.inference.generation import generate

    net, tokenizer, *_ = load_trained(recipe.ckpt)
    prompt, steps = tokenizer.encode("the cow"), 32
    llm = llama_cpp_model(recipe.gguf, len(prompt) + steps)
    try:
        theirs = []
        llm.eval(prompt)
        for _ in range(steps):
            theirs.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval([theirs[-1]])
    finally:
        llm.close()
    assert generate(net, prompt, steps, temperature=0) == theirs
