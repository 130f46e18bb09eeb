"""Tests for the plain Llama model and the size table (CPU, fast, deterministic)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from qat.models.sizes import MODEL_SIZES, llama_config
from qat.models.llama import Llama, LlamaConfig, flops_per_token
from qat.models.llama import Attention, apply_rope, rope_table
from qat.models.sizes import non_embedding_params

QUEST_VOCAB = 50304


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=64, n_layer=2, d_model=64, n_head=4, multiple_of=32, max_seq_len=64)
    return LlamaConfig(**{**kwargs, **overrides})


# ---------------------------------------------------------------- sizes and counts

# N (non-embedding, norms included) and SwiGLU hidden size from the QuEST size table;
# 3.2B is our extrapolation (N from 28 * (4d^2 + 3*d*hidden + 2d) + d).
QUEST_SIZES = {
    "30M": (30_482_560, 1792),
    "50M": (49_556_736, 2048),
    "100M": (102_777_856, 2816),
    "200M": (203_188_480, 3584),
    "430M": (443_068_288, 4608),
    "800M": (822_151_168, 5632),
    "1.6B": (1_586_076_160, 6912),
    "3.2B": (3_171_068_928, 8192),
}
# hidden = 128 * ceil(int(8d/3) / 128): d=128 -> 341 -> 384, d=256 -> 682 -> 768.
DEBUG_SIZES = {"debug-xs": (213_376, 384), "debug": (426_624, 384), "debug-l": (1_705_216, 768)}


def test_size_table_has_exactly_the_expected_rows():
    assert list(MODEL_SIZES) == [*DEBUG_SIZES, *QUEST_SIZES]


@pytest.mark.parametrize("name", [*QUEST_SIZES, *DEBUG_SIZES])
def test_param_count_and_hidden_size(name):
    expected_n, expected_hidden = {**QUEST_SIZES, **DEBUG_SIZES}[name]
    cfg = llama_config(name, vocab_size=QUEST_VOCAB)
    assert cfg.ffn_dim == expected_hidden
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_params() == expected_n
    assert model.num_params(non_embedding=False) == expected_n + 2 * QUEST_VOCAB * cfg.d_model
    # closed form: per layer 4d^2 (q, k, v, o) + 3*d*hidden (SwiGLU) + 2d (norms), plus the final norm
    d, h = cfg.d_model, cfg.ffn_dim
    assert expected_n == cfg.n_layer * (4 * d * d + 3 * d * h + 2 * d) + d


@pytest.mark.parametrize("name", DEBUG_SIZES)
def test_cpu_sizes_fit_128_block_hadamard(name):
    cfg = llama_config(name, vocab_size=QUEST_VOCAB)
    assert cfg.d_model % 128 == 0 and cfg.ffn_dim % 128 == 0
    assert MODEL_SIZES[name].peak_lr == 3e-3


def test_non_embedding_params_and_lr_rule():
    assert non_embedding_params("debug-l") == 1_705_216
    # The LR halves per doubling; 3.2B continues the rule from 1.6B.
    assert MODEL_SIZES["3.2B"].peak_lr == MODEL_SIZES["1.6B"].peak_lr / 2


def test_llama_config_rejects_unknown_size_and_field():
    with pytest.raises(ValueError, match=r"'7B'.*debug-xs.*30M.*3\.2B"):
        llama_config("7B", vocab_size=100)
    with pytest.raises(ValueError, match="n_layers"):
        llama_config("debug", vocab_size=100, n_layers=3)
    cfg = llama_config("debug", vocab_size=100, max_seq_len=128, tie_embeddings=True, n_kv_head=1)
    assert (cfg.max_seq_len, cfg.tie_embeddings, cfg.kv_heads, cfg.n_layer) == (128, True, 1, 2)


def test_flops_per_token_hand_count():
    cfg = LlamaConfig(vocab_size=10, n_layer=2, d_model=8, n_head=2, n_kv_head=1, ffn_hidden=16)
    T = 5
    # matmul weights: qkv 8*(2+2*1)*4 = 128, proj 64, gate/up/down 3*8*16 = 384 -> 576 per layer;
    # 2 layers + lm_head 8*10 = 1232.
    matmul_params = 2 * (128 + 64 + 384) + 80
    # causal pairs (i, j <= i) for T=5: 15, i.e. 3 per token; each pair costs 2*d for q.k and
    # 2*d for attn.v in each of 2 layers.
    pairs_per_token = sum(1 for i in range(T) for j in range(i + 1)) / T
    attention = 2 * 2 * cfg.d_model * pairs_per_token * cfg.n_layer
    assert flops_per_token(cfg, T) == 3 * (2 * matmul_params + attention) == 7968

    # The matmul part equals what torch counts for a real forward + backward.
    B = 3
    model = Llama(cfg)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 10, (B, T))).sum().backward()
    measured_mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    assert measured_mm == 3 * 2 * matmul_params * B * T


def test_flops_per_token_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(tiny_config(), 0)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layer=-1), "n_layer"),
        (dict(n_layer=2.0), "n_layer"),
        (dict(n_layer=True), "n_layer"),
        (dict(n_head=0), "n_head"),
        (dict(d_model=60, n_head=8), "d_model"),  # not divisible
        (dict(d_model=12, n_head=4), "d_model"),  # head_dim 3 is odd: RoPE needs pairs
        (dict(n_kv_head=3), "n_kv_head"),  # does not divide n_head=4
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(multiple_of=0), "multiple_of"),
        (dict(ffn_hidden=0), "ffn_hidden"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(norm_eps=-1e-5), "norm_eps"),
        (dict(init_std=0.0), "init_std"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_sequence_longer_than_max_seq_len_is_rejected():
    model = Llama(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ---------------------------------------------------------------- init


def test_init_statistics():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, n_layer=8, d_model=256, n_head=4, multiple_of=128)
    model = Llama(cfg)
    residual_std = 0.02 / math.sqrt(2 * 8)  # 0.005
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = residual_std if name.endswith(("attn.proj.weight", "mlp.down.weight")) else 0.02
        # >= 65k samples each: the std estimate is within ~0.3% (1 sigma) of the truth.
        assert p.std().item() == pytest.approx(expected, rel=0.02), name
        assert abs(p.mean().item()) < 3 * expected / math.sqrt(p.numel()) + 1e-6, name


def test_meta_build_then_to_empty_and_init_matches_a_direct_build():
    cfg = tiny_config()
    direct = Llama(cfg)
    idx = torch.randint(0, 64, (2, 16))
    direct(idx)  # fills the RoPE cache, which init_weights must reset
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")  # parameters hold garbage now
    # (nn.Linear's own constructor init draws from the RNG on CPU but not on meta,
    # so compare the two after re-seeding init_weights, the only init that matters.)
    for m in (direct, model):
        torch.manual_seed(1)
        m.init_weights()
    assert direct.rope_cache.numel() == 0 and model.rope_cache.numel() == 0
    assert torch.equal(model(idx), direct(idx))


# ---------------------------------------------------------------- RoPE


def complex_rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [T, hd] -> rotated, in float64 complex arithmetic on pairs (2i, 2i+1)."""
    x = x.double()
    hd = x.shape[-1]
    z = torch.complex(x[:, 0::2], x[:, 1::2])  # [T, hd/2]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = positions.double()[:, None] * freqs[None, :]
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)  # [T, hd]


def test_rope_matches_float64_complex_reference():
    torch.manual_seed(0)
    T, hd = 2048, 64
    x = torch.randn(T, hd)
    table = rope_table(T, hd, 10000.0, torch.device("cpu"))
    ours = apply_rope(x[None, :, None, :], table)[0, :, 0, :]  # as [B=1, T, H=1, hd]
    ref = complex_rope_reference(x, torch.arange(T), 10000.0)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, atol=2e-6, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 32
    table = rope_table(1024, hd, 10000.0, torch.device("cpu"))
    q, k = torch.randn(hd), torch.randn(hd)

    def score(m: int, n: int) -> float:
        rq = apply_rope(q.view(1, 1, 1, hd), table[m : m + 1]).flatten()
        rk = apply_rope(k.view(1, 1, 1, hd), table[n : n + 1]).flatten()
        return (rq.double() @ rk.double()).item()

    for m, n in [(5, 2), (40, 40), (3, 17)]:
        base = score(m, n)
        for shift in (1, 100, 900):
            assert score(m + shift, n + shift) == pytest.approx(base, abs=1e-4)
    assert score(5, 2) != pytest.approx(score(6, 2), abs=1e-3)  # and it does depend on the offset


# ---------------------------------------------------------------- attention and the whole model


def reference_attention(attn: Attention, x: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Explicit float64 attention: manual causal softmax; query head h reads kv head h // group."""
    B, T, _ = x.shape
    H, Hkv, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
    qkv = x.double() @ attn.qkv.weight.double().T
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    out = torch.empty(B, T, H, hd, dtype=torch.float64)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    positions = torch.arange(T)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            qh = complex_rope_reference(q[b, :, h * hd : (h + 1) * hd], positions, cfg.rope_theta)
            kh = complex_rope_reference(k[b, :, g * hd : (g + 1) * hd], positions, cfg.rope_theta)
            scores = (qh @ kh.T / math.sqrt(hd)).masked_fill(~mask, float("-inf"))
            weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
            out[b, :, h] = weights @ v[b, :, g * hd : (g + 1) * hd]
    return out.reshape(B, T, H * hd) @ attn.proj.weight.double().T


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_attention_matches_float64_reference(n_kv_head):
    torch.manual_seed(0)
    cfg = tiny_config(n_kv_head=n_kv_head)
    model = Llama(cfg)
    attn = model.layers[0].attn
    x = torch.randn(2, 12, cfg.d_model)
    ours = attn(x, model._rope(12, x.device))
    torch.testing.assert_close(ours.double(), reference_attention(attn, x, cfg), atol=1e-5, rtol=1e-5)


def test_gqa_single_kv_head_shapes():
    cfg = tiny_config(n_kv_head=1)  # n_head 4, head_dim 16
    model = Llama(cfg)
    assert model.layers[0].attn.qkv.weight.shape == ((4 + 2 * 1) * 16, 64)
    assert model(torch.randint(0, 64, (2, 10))).shape == (2, 10, 64)


def test_model_matches_float64_reference():
    """The whole forward against a direct float64 transcription of the architecture."""
    torch.manual_seed(0)
    cfg = tiny_config(n_kv_head=2)
    model = Llama(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 10))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w.double()

    x = model.embed.weight.double()[idx]
    for blk in model.layers:
        x = x + reference_attention(blk.attn, rms(x, blk.attn_norm.weight), cfg)
        h = rms(x, blk.mlp_norm.weight)
        gate, up, down = (blk.mlp.gate.weight.double(), blk.mlp.up.weight.double(), blk.mlp.down.weight.double())
        x = x + (F.silu(h @ gate.T) * (h @ up.T)) @ down.T
    ref = rms(x, model.norm.weight) @ model.lm_head.weight.double().T
    torch.testing.assert_close(model(idx).double(), ref, atol=1e-5, rtol=1e-5)


def test_causality():
    torch.manual_seed(0)
    model = Llama(tiny_config())
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 1) % 64
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it


def test_tied_embeddings_share_storage_and_count_once():
    cfg = tiny_config(tie_embeddings=True)
    model = Llama(cfg)
    assert model.lm_head.weight is model.embed.weight
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = Llama(tiny_config())
    V, d = cfg.vocab_size, cfg.d_model
    assert model.num_params() == untied.num_params()
    assert model.num_params(non_embedding=False) == model.num_params() + V * d
    assert untied.num_params(non_embedding=False) == untied.num_params() + 2 * V * d


def test_linear_modules_are_the_documented_ones():
    model = Llama(tiny_config(n_layer=1))
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [
        "layers.0.attn.qkv",
        "layers.0.attn.proj",
        "layers.0.mlp.gate",
        "layers.0.mlp.up",
        "layers.0.mlp.down",
        "lm_head",
    ]
    assert "rope_cache" not in model.state_dict()


@pytest.mark.slow  # subprocesses or compilation: out of the quick loop, in CI's suite
def test_bf16_autocast_and_compile_agree_with_eager():
    torch.manual_seed(0)
    model = Llama(tiny_config())
    idx = torch.randint(0, 64, (2, 16))
    eager = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(idx)
    assert low.dtype == torch.bfloat16 and model.rope_cache.dtype == torch.float32
    torch.testing.assert_close(low.float(), eager, atol=0.05, rtol=0.05)
    # fullgraph=True fails on any graph break (data-dependent control flow in forward).
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx), eager, atol=1e-6, rtol=1e-6)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Llama(tiny_config())
    idx = torch.randint(0, 64, (4, 33))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(64), abs=0.1)  # N(0, 0.02) init: near-uniform logits
    assert losses[-1] < 0.1  # reaches ~0.006
