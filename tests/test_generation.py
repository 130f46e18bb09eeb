"""KV-cached generation == full recompute, on a quantized model, also when the window slides."""

import pytest
import torch

from qat.models.llama import Llama
from qat.models.sizes import llama_config
from qat import QuantizerConfig, quantize_model
from qat.inference.generation import generate


def _net(max_seq_len: int = 64) -> Llama:
    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=50, max_seq_len=max_seq_len))
    with torch.no_grad():  # away from init, so that the tokens are not all alike
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    quantize_model(net, QuantizerConfig(bits=4), QuantizerConfig(bits=4))
    return net.double().eval()  # float64: cache vs recompute differ only in summation order


@pytest.mark.parametrize("max_seq_len, new_tokens", [(64, 20), (16, 30)])
def test_cached_greedy_equals_recompute(max_seq_len, new_tokens):
    net = _net(max_seq_len)
    prompt = [3, 1, 4, 1, 5]
    cached = generate(net, prompt, new_tokens, temperature=0)
    recomputed = generate(net, prompt, new_tokens, temperature=0, use_cache=False)
    assert cached == recomputed and len(cached) == new_tokens
    assert len(set(cached)) > 2  # not a degenerate constant stream


def test_cached_sampling_equals_recompute_for_the_same_seed():
    net = _net()
    runs = [
        generate(net, [7], 25, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(3), use_cache=use)
        for use in (True, False)
    ]
    assert runs[0] == runs[1]


def test_stop_token_and_empty_prompt():
    net = _net()
    first = generate(net, [2, 3], 1, temperature=0)[0]
    assert generate(net, [2, 3], 10, temperature=0, stop_id=first) == [first]
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(net, [], 3)


def test_sample_text_keeps_the_tokenizers_spacing(tmp_path):
    """A word-level tokenizer's decoder inserts the spaces: the prompt and the continuation,
    decoded apart and joined, ran together ("w10w66"); decoded as one sequence they do not."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from qat.data.tokenizer import HFTokenizer
    from qat.inference.generation import sample_text

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(80)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.save(str(tmp_path / "words.json"))
    tok = HFTokenizer(str(tmp_path / "words.json"))
    prompt = tok.encode("w7 w8 w9 w10")
    assert tok.decode(prompt) + tok.decode(tok.encode("w66 w71")) == "w7 w8 w9 w10w66 w71"  # the bug's shape
    assert sample_text(tok, prompt, tok.encode("w66 w71") + [tok.eos_id]) == "w7 w8 w9 w10 w66 w71"
    assert sample_text(tok, [tok.eos_id], tok.encode("w1 w2")) == "w1 w2"  # no prompt: start of a document


def test_last_only_logits_are_the_last_row_of_the_full_forward():
    torch.manual_seed(0)
    net = Llama(llama_config("debug-xs", vocab_size=64)).eval()
    idx = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = net(idx)
        cache = net.new_kv_cache(2, 12)
        last = net(idx, cache, last_only=True)
        assert last.shape == (2, 1, 64) and cache.length == 9
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net(idx, last_only=True), full[:, -1:], rtol=1e-5, atol=1e-6)  # one row: another GEMM blocking


@pytest.mark.slow  # a script end to end: out of the quick loop
def test_generate_script_folds_16_bit_rotations_unless_unfolded(tmp_path, capsys, monkeypatch):
    """generate.py --ckpt on a W4A16 Hadamard checkpoint: by default the rotation is folded into
    the cached weights (fold_input_rotations), with --unfolded it is not; greedy text is the same."""
    import importlib.util

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from conftest import ROOT
    from qat.quant import linear as linear_module
    from qat.train.checkpoint import write_model_checkpoint
    from qat.train.lifecycle import build_net

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=["model=debug-xs", "quant.activation.bits=16"]), resolve=True)
    torch.manual_seed(0)
    net = build_net(cfg, instantiate(OmegaConf.create(cfg["tokenizer"])).vocab_size)
    ckpt = write_model_checkpoint(tmp_path / "w4a16.ckpt", net, cfg, step=1)
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folded = []
    monkeypatch.setattr(script, "fold_input_rotations", lambda n: folded.append(linear_module.fold_input_rotations(n)))
    monkeypatch.chdir(tmp_path)
    texts = []
    for extra in ([], ["--unfolded"]):
        assert script.main(["--ckpt", str(ckpt), "--prompt", "farm:", "--tokens", "16", "--temperature", "0", *extra]) == 0
        texts.append(capsys.readouterr().out.split("---\n")[1].split("\n[")[0])
    assert len(folded) == 1 and len(folded[0]) == 5  # the default run folded all five linears of the block
    assert texts[0] == texts[1]
