"""Low-bit Triton GEMMs == their torch references: the packed format's integer path
(`integer_matmul`, exact int64 sums) and dequantize path (F.linear on `format.dequantize`).

Without CUDA the kernels run in Triton's CPU interpreter on fp32 with small tiles (so K tails
and several M / N blocks occur at small shapes); the integer sums must be equal, outputs
agree to fp32 rounding. With CUDA the same tests run compiled, and the `gpu` tests add bf16
and a whole packed model through Triton against the CPU reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first built
DEVICE = "cpu" if INTERPRET else "cuda"

from qat.kernels.lowbit_plan import GemmTiles
from qat.kernels.lowbit_ops import IntForm, lowbit_dequant_matmul, lowbit_int_accumulators, lowbit_int_matmul  # noqa: E402
from qat.kernels.lowbit_plan import TERNARY_RECIPROCALS  # noqa: E402
from qat.packed.format import dequantize, integer_form, levels_tensor, to_int8  # noqa: E402
from qat.packed.linear import PackedLinear, forward_path, integer_matmul, layer_backend  # noqa: E402
from qat.packed.packing import pack_codes  # noqa: E402
from qat.quant.config import QuantizerConfig  # noqa: E402
from qat.quant.grids import make_grid  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[1]
WARPS = 1 if INTERPRET else 4


def _tiles(split: int = 1) -> GemmTiles:
    """Small tiles: K = 72 leaves a tail of 8, M = 17 makes two M blocks, N = 40 two N blocks."""
    return GemmTiles(16, 32, 32, split_k=split, num_warps=WARPS)


TINY = _tiles()
WEIGHT_BITS = [1, 1.58, 2, 3, 4, 5, 6, 7, 8]
ACT_FORMATS = [(4, "int"), (8, "int"), (2, "int_zero"), (8, "int_zero"), (1.58, "int"), (3, "int")]


# Interpreter runs of every kernel: in the default (CI) command, outside the quick loop.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape, grid, seed: int) -> torch.Tensor:
    return torch.randint(0, grid.size, shape, generator=_gen(seed), dtype=torch.int64)


def _scales(rows: int, groups: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, groups, generator=_gen(seed)) + 0.5


def _dev(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


def _int_case(w_bits, w_grid, a_bits, a_grid, m, n, k, ga=1, gw=1, seed=0):
    """Random codes and scales on both sides, the weight packed: the integer GEMM's inputs."""
    wg, ag = make_grid(w_bits, w_grid), make_grid(a_bits, a_grid)
    w_codes, a_codes = _codes((n, k), wg, seed), _codes((m, k), ag, seed + 1).to(torch.int32)
    packed, sw, sa = _dev(pack_codes(w_codes, w_bits), _scales(n, gw, seed + 2), _scales(m, ga, seed + 3))
    return wg, ag, w_codes, a_codes.to(DEVICE), packed, sa, sw


def _reference_sums(a_codes, ag, w_codes, wg, segments: int) -> torch.Tensor:
    """sum_k q_a q_w per segment of K, in int64: [M, N, S]."""
    fa, fw = integer_form(ag), integer_form(wg)
    qa = to_int8(a_codes.cpu(), fa).long() * fa.mul + fa.offset
    qw = to_int8(w_codes, fw).long() * fw.mul + fw.offset
    seg = -(-a_codes.shape[1] // segments)
    return torch.stack([qa[:, s : s + seg] @ qw[:, s : s + seg].T for s in range(0, a_codes.shape[1], seg)], -1)


def _forms(ag, wg):
    fa, fw = integer_form(ag), integer_form(wg)
    return IntForm(*fa[:4]), IntForm(*fw[:4]), fa.divisor * fw.divisor


def test_ternary_reciprocals_are_exact_for_every_byte():
    for d, r in enumerate(TERNARY_RECIPROCALS):
        assert all((x * r) >> 16 == x // 3**d for x in range(243))
    assert all(((q * 171) >> 9) == q // 3 for q in range(243))


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_unpacking_every_width(bits):
    # Identity rows times W^T with the level table 0..n-1 reads the codes back: every code
    # of every width (crossing bytes at 3, 5, 6, 7; base 3 for ternary), with a K tail.
    n, k = 40, 72
    grid = make_grid(bits, "int")
    codes = _codes((n, k), grid, seed=int(bits * 10))
    eye, packed, ones, table = _dev(torch.eye(k), pack_codes(codes, bits), torch.ones(n, 1), torch.arange(grid.size, dtype=torch.float64))
    got = lowbit_dequant_matmul(eye, packed, bits, ones, levels=table, tiles=TINY)
    assert torch.equal(got.cpu(), codes.T.float())


@pytest.mark.parametrize("w_bits", WEIGHT_BITS)
@pytest.mark.parametrize("w_grid", ["int", "int_zero"])
def test_int_gemm_sums_are_exact(w_bits, w_grid):
    if w_grid == "int_zero" and w_bits == 1:
        pytest.skip("int_zero has no 1-bit grid")
    a_bits, a_grid = ACT_FORMATS[WEIGHT_BITS.index(w_bits) % len(ACT_FORMATS)]
    for m in (1, 3, 17):
        wg, ag, w_codes, a_codes, packed, sa, sw = _int_case(w_bits, w_grid, a_bits, a_grid, m, 40, 72, seed=m)
        fa, fw, divisor = _forms(ag, wg)
        acc = lowbit_int_accumulators(a_codes, fa, sa, packed, w_bits, fw, sw, tiles=TINY)
        assert torch.equal(acc.cpu().long(), _reference_sums(a_codes, ag, w_codes, wg, 1)), m
        y = lowbit_int_matmul(a_codes, fa, sa, packed, w_bits, fw, sw, divisor=divisor, tiles=TINY)
        ref = integer_matmul(to_int8(a_codes.cpu(), integer_form(ag)), integer_form(ag), sa.cpu(), to_int8(w_codes, integer_form(wg)), integer_form(wg), sw.cpu())
        torch.testing.assert_close(y.cpu().double(), ref, rtol=4e-7, atol=4e-7 * ref.abs().max().item())


@pytest.mark.parametrize("ga,gw,split", [(1, 1, 3), (3, 1, 1), (1, 3, 2), (1, 1, 1)])
def test_int_gemm_groups_offsets_split_and_strides(ga, gw, split):
    # 8-bit "int" on both sides: u = code - 128, q = 2u + 1, every row-sum correction runs.
    m, n, k = 17, 40, 96
    tiles = _tiles(split)
    wg, ag, w_codes, a_codes, packed, sa, sw = _int_case(8, "int", 8, "int", m, n, k, ga=ga, gw=gw, seed=5)
    strided = torch.zeros(k, 2 * m, dtype=torch.int16, device=DEVICE)[:, ::2].T  # strides (2, 2m)
    strided.copy_(a_codes)
    fa, fw, divisor = _forms(ag, wg)
    bias = torch.randn(n, generator=_gen(6)).to(DEVICE)
    y = lowbit_int_matmul(strided, fa, sa, packed, 8, fw, sw, divisor=divisor, bias=bias, tiles=tiles)
    ref = integer_matmul(to_int8(a_codes.cpu(), integer_form(ag)), integer_form(ag), sa.cpu(), to_int8(w_codes, integer_form(wg)), integer_form(wg), sw.cpu())
    ref = ref + bias.cpu().double()
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    segments = max(ga, gw) if (ga, gw) != (1, 1) else split
    acc = lowbit_int_accumulators(strided, fa, sa, packed, 8, fw, sw, tiles=tiles)
    assert torch.equal(acc.cpu().long(), _reference_sums(a_codes, ag, w_codes, wg, segments))


DEQUANT_FORMATS = [(1, "int"), (1.58, "int_zero"), (2, "gaussian"), (3, "int"), (4, "fp4"), (4, "gaussian"), (5, "int_zero"), (6, "int"), (7, "int_zero"), (8, "gaussian"), (8, "int")]


def _dequant_reference(a, codes, scale, grid, bias=None):
    return F.linear(a.cpu().double(), dequantize(codes, scale.cpu(), grid).double(), None if bias is None else bias.cpu().double())


def _assert_float_close(y, ref):
    """fp32 outputs within summation-order error of the float64 reference."""
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.cpu().double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


@pytest.mark.parametrize("bits,grid", DEQUANT_FORMATS)
def test_dequant_gemm_every_grid(bits, grid):
    g = make_grid(bits, grid)
    i = DEQUANT_FORMATS.index((bits, grid))
    n, k, groups, split = 40, 96 if i % 2 else 72, (3 if i % 2 else 1), 1 + i % 3
    codes = _codes((n, k), g, seed=i)
    packed, scale = _dev(pack_codes(codes, bits), _scales(n, groups, i))
    kw = {"center": g.center} if g.uniform else {"levels": levels_tensor(g).to(DEVICE)}
    bias = torch.randn(n, generator=_gen(i)).to(DEVICE) if i % 2 else None
    tiles = _tiles(split)
    for m in (1, 3, 17):
        a = torch.randn(k, 2 * m, generator=_gen(m)).to(DEVICE)[:, ::2].T  # a strided input
        y = lowbit_dequant_matmul(a, packed, bits, scale, bias=bias, tiles=tiles, **kw)
        _assert_float_close(y, _dequant_reference(a, codes, scale, g, bias))


@pytest.mark.parametrize("bits,grid", [(4, "gaussian"), (1.58, "int_zero"), (3, "int")])
def test_dequant_gemm_two_of_four(bits, grid):
    from qat.packed.format import merge_two_of_four

    g = make_grid(bits, grid)
    n, k = 40, 96
    kept = _codes((n, k // 2), g, seed=3)
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    positions = pairs[torch.randint(0, 6, (n, k // 4), generator=_gen(4))].reshape(n, k // 2)
    dense, keep = merge_two_of_four(kept, positions)
    packed, pos, scale = _dev(pack_codes(kept, bits), pack_codes(positions, 2), _scales(n, 3, 5))
    kw = {"center": g.center} if g.uniform else {"levels": levels_tensor(g).to(DEVICE)}
    a = torch.randn(17, k, generator=_gen(6)).to(DEVICE)
    y = lowbit_dequant_matmul(a, packed, bits, scale, positions=pos, tiles=TINY, **kw)
    ref = F.linear(a.cpu().double(), (dequantize(dense, scale.cpu(), g) * keep).double())
    _assert_float_close(y, ref)


def test_bad_inputs_raise():
    g = make_grid(4, "int")
    packed = pack_codes(_codes((8, 64), g, 0), 4).to(DEVICE)
    a = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="bytes a row"):
        lowbit_dequant_matmul(a, packed, 3, torch.ones(8, 1, device=DEVICE), center=3.5)
    with pytest.raises(ValueError, match="exactly one of center"):
        lowbit_dequant_matmul(a, packed, 4, torch.ones(8, 1, device=DEVICE))
    with pytest.raises(ValueError, match="integer"):
        lowbit_int_matmul(a, IntForm(2, 15, 1, 0), torch.ones(2, 1), packed, 4, IntForm(2, 15, 1, 0), torch.ones(8, 1), divisor=1.0)
    with pytest.raises(ValueError, match="bits=9"):
        lowbit_dequant_matmul(a, packed, 9, torch.ones(8, 1, device=DEVICE), center=3.5)


# ---- dispatch: the backend rule, decided when the model is loaded ----------------------------


def test_backend_rule(monkeypatch):
    q = QuantizerConfig
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the rule, not by already-built kernels
    assert layer_backend("auto", "cpu") == "cpu" and layer_backend("torch", "cpu") == "torch"
    assert layer_backend("auto", "cuda") == "auto" and layer_backend("auto", "meta") == "torch"
    with pytest.raises(ValueError, match="backend='cpu' cannot run on device cuda"):
        layer_backend("cpu", "cuda")
    assert layer_backend("triton", "cpu") == "triton"  # the interpreter is on in this file
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run on device cpu"):
        layer_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        layer_backend("cuda", "cpu")
    assert forward_path(q(bits=4), q(bits=4), "triton") == "triton-integer"
    assert forward_path(q(bits=4, grid="gaussian"), q(bits=16), "auto") == "triton-dequantize"
    assert forward_path(q(bits=16), q(bits=4), "triton") == "dequantize"  # nothing to decode: F.linear
    assert forward_path(q(bits=4), q(bits=4), "auto", "dtype float64") == "integer"  # auto falls back
    with pytest.raises(ValueError, match="backend='triton' does not support dtype float64"):
        PackedLinear(64, 8, q(bits=4), q(bits=4), weight_dtype="float64", backend="triton")
    with pytest.raises(ValueError, match="scale group 24"):
        PackedLinear(48, 8, q(bits=4, granularity=24), q(bits=4, granularity=48), backend="triton")
    assert PackedLinear(64, 8, q(bits=4), q(bits=4), backend="triton").fused_input.estimator == "ste"
    assert PackedLinear(64, 8, q(bits=4), q(bits=4, scale="absmax"), backend="triton").fused_input is None


# ---- whole packed models: Triton backend == torch backend -----------------------------------

def export_debug_model(tmp_path, weight: dict, activation: dict, dtype=torch.float32) -> Path:
    """debug-xs moved off its init, quantized, exported through the packed format."""
    from qat.data.tokenizer import ByteTokenizer
    from qat.packed.export import export_packed
    from test_packed import RUN_CONFIG, build_fake_quant

    return export_packed(build_fake_quant(weight, activation, dtype=dtype), ByteTokenizer(), RUN_CONFIG, 7, tmp_path / "packed")


def _assert_backends_agree(path: Path, device: str, tokens: int) -> None:
    from qat.inference.generation import generate
    from qat.packed.load import load_packed

    ref = load_packed(path, "cpu", backend="torch").net
    tri = load_packed(path, device, backend="triton").net
    assert all(m.path.startswith("triton-") for m in tri.modules() if isinstance(m, PackedLinear) and m.weight_cfg.enabled)
    prompt = torch.randint(0, 257, (2, 9), generator=_gen(1))
    with torch.no_grad():
        want, got = ref(prompt), tri(prompt.to(device)).cpu()
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    # The interpreter repeats the reference's float ops; compiled, the fused quantizer's
    # tensor-core rotation may round a near-tie activation the other way (a step, ~1e-3).
    assert err < (1e-5 if device == "cpu" else 2e-3), err
    assert generate(tri, [1, 2, 3], tokens, temperature=0) == generate(ref, [1, 2, 3], tokens, temperature=0)


@torch.no_grad()
def test_packed_w4a4_model_triton_equals_torch(tmp_path):
    _assert_backends_agree(export_debug_model(tmp_path, {"bits": 4}, {"bits": 4}), DEVICE, tokens=3)


MODEL_CASES = [
    pytest.param({"bits": 4, "grid": "gaussian", "sparsity": "2:4", "granularity": 32}, {"bits": 16}, id="w4-gaussian-2of4-a16"),
    pytest.param({"bits": 3, "grid": "int_zero", "granularity": 64, "rotation": "none"}, {"bits": 8, "granularity": 32, "rotation": "none"}, id="w3-a8-groups"),
    pytest.param({"bits": 1.58, "grid": "int_zero"}, {"bits": 4, "grid": "fp4"}, id="ternary-afp4"),
]


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("weight,activation", MODEL_CASES)
def test_packed_model_triton_equals_torch(weight, activation, tmp_path):
    _assert_backends_agree(export_debug_model(tmp_path, weight, activation), DEVICE, tokens=6)


def _generate_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_generate_script_triton_gives_the_torch_tokens(tmp_path, capsys):
    script = _generate_script()
    path = export_debug_model(tmp_path, {"bits": 4}, {"bits": 4})
    texts = []
    for backend in ("torch", "triton"):
        argv = ["--model", str(path), "--prompt", "ab", "--tokens", "6", "--temperature", "0", "--device", DEVICE, "--backend", backend]
        assert script.main(argv) == 0
        texts.append(capsys.readouterr().out.split("\n[")[0])
    assert texts[0] == texts[1]


def test_scripts_refuse_triton_where_it_cannot_run(tmp_path, capsys, monkeypatch):
    from qat.inference.loading import load_model

    script = _generate_script()
    path = export_debug_model(tmp_path, {"bits": 4}, {"bits": 4})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert script.main(["--model", str(path), "--device", "cpu", "--backend", "triton"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: backend='triton' cannot run on device cpu") and "\n" not in err
    with pytest.raises(ValueError, match="applies to packed models"):
        load_model(ckpt="x.ckpt", backend="triton")


# ---- sm_90 compile: int8 tensor-core MMA, no spills (runs without a GPU) --------------------

_HOPPER_CHECK = """
import json
from qat.kernels.aot import S8_MMA, LowbitVariant, W8_INT, compile_lowbit
out = []
for v in (LowbitVariant("int", 4, 4096), LowbitVariant("int", 8, 16, forms=(W8_INT, W8_INT)), LowbitVariant("dequant", 3, 1)):
    c = compile_lowbit(v)
    out.append([v.kernel, c.count(S8_MMA), c.spill_bytes])
print(json.dumps(out))
"""


def _without_interpreter(code: list[str], timeout: int) -> subprocess.CompletedProcess:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, *code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    return run


def test_lowbit_kernels_compile_for_hopper_with_int8_mma_and_no_spills():
    run = _without_interpreter(["-c", _HOPPER_CHECK], timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for kernel, s8_mma, spill in json.loads(run.stdout.splitlines()[-1]):
        assert (s8_mma > 0) == (kernel == "int") and spill in (0, None)


@pytest.mark.slow
def test_aot_report_checks_hold():
    run = _without_interpreter(["-m", "qat.kernels.aot"], timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "checks: all hold" in run.stdout


# ---- GPU only: bf16, compiled, whole model against the CPU reference ------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("bits,grid", [(4, "int"), (1.58, "int_zero"), (3, "int"), (4, "gaussian"), (8, "int")])
def test_gpu_bf16_gemms_match_the_reference(bits, grid):
    g = make_grid(bits, grid)
    m, n, k = 33, 4096, 4096
    codes = _codes((n, k), g, 0)
    packed, scale = pack_codes(codes, bits).cuda(), _scales(n, 1, 1).cuda()
    a = torch.randn(m, k, generator=_gen(2)).cuda().bfloat16()
    kw = {"center": g.center} if g.uniform else {"levels": levels_tensor(g).cuda()}
    for rows in (1, 16, m):
        y = lowbit_dequant_matmul(a[:rows], packed, bits, scale, **kw)
        ref = F.linear(a[:rows].float(), dequantize(codes.cuda(), scale, g).bfloat16().float())
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    if g.uniform:
        ag = make_grid(4, "int")
        a_codes = _codes((m, k), ag, 3).to(torch.int32).cuda()
        fa, fw, divisor = _forms(ag, g)
        sa = _scales(m, 1, 4).cuda()
        for rows in (1, 16, m):
            acc = lowbit_int_accumulators(a_codes[:rows], fa, sa[:rows], packed, bits, fw, scale, tiles=GemmTiles(16, 64, 128))
            assert torch.equal(acc.cpu().long(), _reference_sums(a_codes[:rows], ag, codes, g, 1))
            y = lowbit_int_matmul(a_codes[:rows], fa, sa[:rows], packed, bits, fw, scale, divisor=divisor, out_dtype=torch.bfloat16)
            ref = (acc[..., 0].double() * sa[:rows].double() * scale.double().T / divisor).float()
            torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@gpu
@needs_cuda
@torch.no_grad()
@pytest.mark.parametrize("weight,activation", [({"bits": 4}, {"bits": 4}), *MODEL_CASES])
def test_gpu_packed_model_through_triton_gives_the_cpu_tokens(weight, activation, tmp_path):
    _assert_backends_agree(export_debug_model(tmp_path, weight, activation), "cuda", tokens=16)
