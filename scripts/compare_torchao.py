"""torchao's QAT and ours on the same model, the same batches in the same order, the same
optimizer, schedule and steps, in one process.

    python scripts/compare_torchao.py --model llama-dir --data corpus.jsonl --steps 200 --out cmp/
    python scripts/compare_torchao.py --model llama-dir --data corpus.jsonl --arms unquantized ours-w4a4-had --out cmp/

Every arm starts from `load_hf_llama(--model)` (our plain Llama: its linears are nn.Linear,
so torchao's `quantize_` converts them as it converts any model) and trains on one list of
--steps batches, materialized once from `data=local data.path=--data` with the checkpoint's
tokenizer (held-out batches from the data module's val split). lm_head and the embedding
stay 16-bit in every arm. The loop is plain PyTorch (qat/inference/compare.py): AdamW
(weight decay 0), linear warm-up + cosine, next-token cross-entropy.

Arms (--arms picks a subset; they run in this order):
  unquantized     no quantization; its seconds/step is the denominator of every ratio
  ao-w4a16-g32    torchao QATConfig(IntxWeightOnlyConfig(int4, PerGroup(32))): int4 weights,
                  symmetric, group 32; converted by QATConfig(..., step="convert")
  ao-w4a8-g32     torchao QATConfig(Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))):
                  int8 dynamic per-token asymmetric activations x int4 group-32 weights; + convert
  ours-w4a16-g32  ours, W4A16, group 32, no rotation, absmax scale, int_zero grid (the
                  apples-to-apples arm: 4 bits and a float scale per 32 weights, as torchao's)
  ours-w4a16-g32-nozero  the same on QuEST's "int" grid (16 levels, no zero): a pretrained
                  model's near-zero weights on its outlier input channels cannot stay near zero
  ours-w4a16-had-g32  full Hadamard + group 32, MSE-optimal RMS scale (4.5 bits per weight)
  ours-w4a16-had-g32-absmax  the same with the group's absmax scale (the trust radius follows
                  the scale: half its outermost step)
  ours-w4a16-g32-learned  ours-w4a16-g32 with learned ranges: each group's scale starts at its
                  absmax and is trained (quant.weight.scale_update=learned, LSQ's step gradient)
  ours-w4a16-had-g32-learned  full Hadamard + group 32, each group's scale fitted once by
                  mse_search and then learned (4.5 bits per weight)
  ours-w4a16-had  ours at QuEST settings: full Hadamard, MSE-optimal RMS scale, trust
  ours-w4a8-had   estimator, per-row scales; W4A16, W4A8, W4A4
  ours-w4a4-had
  ARM-kd          every quantized arm also trained by distillation (distill=kd's loss:
                  KL(unadapted 16-bit model || arm) at T = 1) instead of cross-entropy
Our real low-bit form is the packed export (export_packed -> load_packed: integer codes and
the integer forward). torchao's int4 weight-only arm uses IntxWeightOnlyConfig, not
Int4WeightOnlyConfig: the latter's converted form (Int4Tensor) needs the CUDA-only `mslk`
kernels, while IntxWeightOnlyConfig converts and runs on any device, and its QAT fake
quantization is what its convert computes (same group size and symmetric int4 grid).

Reported per arm: held-out perplexity at step 0 (the fake-quantized model before training),
after training, and after the framework's conversion; the mean per-token KL to the unadapted
16-bit model before and after training and the same-top-1 share after (llama.cpp's metrics); mean seconds/step over steps 2..N and
its ratio to the unquantized arm; peak tensor memory of training (parameters + the peak of
torch.profiler's allocation trace over the first step) and the converted model's bytes.
Writes compare_torchao.csv (first line: how memory was measured) and compare_torchao.png
into --out, atomically, and prints a Markdown table. Needs `pip install -e ".[torchao]"`
unless --arms names only our arms.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.torch_version import TorchVersion

from qat.hf.load import check_checkpoint, load_hf_llama
from qat.hf.tokenizer import checkpoint_tokenizer
from qat.inference.compare import MIB, ArmRow, agreement, markdown, perplexity, plot_perplexity, stored_bytes, train_arm, write_csv
from qat.models.llama import Llama, LlamaConfig
from qat.quant.config import QuantizerConfig
from qat.quant.convert import quantize_model
from qat.quant.linear import set_held_scales
from qat.train.lifecycle import build_datamodule, check_quantizable

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUP = 32
CSV_NAME, PLOT_NAME = "compare_torchao.csv", "compare_torchao.png"
INSTALL_HINT = 'pip install -e ".[torchao]"'
TORCHAO_MIN = "0.14"  # keep in step with pyproject's torchao extra
FLAGS = {"data.seq_len": "--seq-len", "data.seed": "--seed", "data.batch_size": "--batch-size", "data.val_batches": "--val-batches"}


def block_linear(module: nn.Module, name: str) -> bool:
    """The layers both frameworks quantize: every nn.Linear but lm_head (embeddings are not Linear)."""
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"


# ---------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    name: str
    framework: str  # "none" | "torchao" | "ours"
    what: str
    prepare: Callable[[nn.Module], None]  # in place, before the optimizer is built
    # The trained fake-quant model -> the framework's real low-bit model (None: nothing to convert).
    convert: Callable[[nn.Module, dict], nn.Module] | None
    converted_form: str
    loss: str = "ce"  # "ce" | "kd" (distillation from the unadapted 16-bit model)


def distilled(arm: Arm) -> Arm:
    """The same arm trained with distill=kd's loss instead of cross-entropy."""
    return dataclasses.replace(arm, name=f"{arm.name}-kd", what=f"{arm.what}, distilled", loss="kd")


def torchao_arm(name: str, what: str, base_config: Callable[[], object], form: str) -> Arm:
    """torchao's two QAT steps around our loop: quantize_(QATConfig(base, "prepare")) swaps in
    FakeQuantizedLinear; QATConfig(base, "convert") swaps back and applies the PTQ config."""

    def prepare(net: nn.Module) -> None:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        quantize_(net, QATConfig(base_config(), step="prepare"), filter_fn=block_linear)

    def convert(net: nn.Module, context: dict) -> nn.Module:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        quantize_(net, QATConfig(base_config(), step="convert"), filter_fn=block_linear)
        return net

    return Arm(name, "torchao", what, prepare, convert, form)


def ours_arm(name: str, what: str, weight: QuantizerConfig, activation: QuantizerConfig) -> Arm:
    def prepare(net: nn.Module) -> None:
        quantize_model(net, weight, activation, filter_fn=block_linear)
        check_quantizable(net)
        set_held_scales(net)  # learned scales: fitted to the weights before the optimizer takes them

    def convert(net: nn.Module, context: dict) -> nn.Module:
        from qat.packed.export import export_packed
        from qat.packed.load import load_packed

        with tempfile.TemporaryDirectory(prefix=".packed-", dir=context["out"]) as tmp:
            run = {"script": "compare_torchao", "arm": name, **context["run"]}
            export_packed(net, context["tokenizer"], run, context["run"]["steps"], Path(tmp) / name)
            return load_packed(Path(tmp) / name).net  # every tensor is read into memory here

    return Arm(name, "ours", what, prepare, convert, "packed codes (load_packed)")


def _ao_int4_weight_only():
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP))


def _ao_int8_act_int4_weight():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP))


def _hadamard(bits: int) -> QuantizerConfig:
    return QuantizerConfig(bits=bits, hadamard_block="full")  # QuEST: rms_mse scale, int grid, trust


A16 = QuantizerConfig(bits=16, rotation="none")
H16 = QuantizerConfig(bits=16, hadamard_block="full")
BASE_ARMS = (
    Arm("unquantized", "none", "no quantization (fp32)", lambda net: None, None, "n/a"),
    torchao_arm("ao-w4a16-g32", "torchao int4 weight-only, group 32", _ao_int4_weight_only, "IntxUnpackedToInt8Tensor"),
    torchao_arm("ao-w4a8-g32", "torchao int8 dyn. act. x int4 weights, group 32", _ao_int8_act_int4_weight, "IntxUnpackedToInt8Tensor"),
    ours_arm("ours-w4a16-g32", "ours W4A16, group 32, no rotation, absmax, int_zero grid",
             QuantizerConfig(bits=4, rotation="none", granularity=GROUP, scale="absmax", grid="int_zero"), A16),
    ours_arm("ours-w4a16-g32-nozero", "ours W4A16, group 32, no rotation, absmax, int grid (no zero)",
             QuantizerConfig(bits=4, rotation="none", granularity=GROUP, scale="absmax"), A16),
    ours_arm("ours-w4a16-had-g32", "ours W4A16, full Hadamard, group 32, trust", QuantizerConfig(bits=4, hadamard_block="full", granularity=GROUP), H16),
    ours_arm("ours-w4a16-had-g32-absmax", "ours W4A16, full Hadamard, group 32, absmax, trust",
             QuantizerConfig(bits=4, hadamard_block="full", granularity=GROUP, scale="absmax"), H16),
    ours_arm("ours-w4a16-g32-learned", "ours W4A16, group 32, no rotation, absmax start, learned scales, int_zero grid",
             QuantizerConfig(bits=4, rotation="none", granularity=GROUP, scale="absmax", grid="int_zero", scale_update="learned"), A16),
    ours_arm("ours-w4a16-had-g32-learned", "ours W4A16, full Hadamard, group 32, mse_search start, learned scales, trust",
             QuantizerConfig(bits=4, hadamard_block="full", granularity=GROUP, scale="mse_search", scale_update="learned"), H16),
    ours_arm("ours-w4a16-had", "ours W4A16, full Hadamard, trust", _hadamard(4), H16),
    ours_arm("ours-w4a8-had", "ours W4A8, full Hadamard, trust", _hadamard(4), _hadamard(8)),
    ours_arm("ours-w4a4-had", "ours W4A4, full Hadamard, trust", _hadamard(4), _hadamard(4)),
)  # fmt: skip
ARMS = {arm.name: arm for base in BASE_ARMS for arm in ((base,) if base.framework == "none" else (base, distilled(base)))}


# ---------------------------------------------------------------- input checks


def import_torchao() -> str:
    """torchao's version, or a one-line ValueError saying how to install it."""
    # Its CUDA-only extensions fail to load on a CPU build and say so in warnings; none is used here.
    for logger in ("torchao", "torch.utils._pytree"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.quantization.qat import QATConfig  # noqa: F401
    except Exception as err:  # ImportError, or a torchao built for another torch
        raise ValueError(f"torchao arms need torchao>={TORCHAO_MIN} ({type(err).__name__}: {str(err).splitlines()[0][:120]}); {INSTALL_HINT}") from None
    # 0.14 is the first whose QATConfig derives its fake quantizers from the Intx configs used here.
    if TorchVersion(torchao.__version__) < TORCHAO_MIN:
        raise ValueError(f"torchao arms need torchao>={TORCHAO_MIN}, found {torchao.__version__}; {INSTALL_HINT}")
    return torchao.__version__


def selected_arms(names: list[str]) -> list[Arm]:
    wanted = [n for item in names for n in item.split(",") if n]
    unknown = [n for n in wanted if n not in ARMS]
    if unknown:
        raise ValueError(f"--arms: {unknown[0]!r} is not an arm; choose from {', '.join(ARMS)}")
    if not wanted:
        raise ValueError(f"--arms names no arm; choose from {', '.join(ARMS)}")
    return [arm for name, arm in ARMS.items() if name in wanted]


def check_layers(cfg: LlamaConfig, arms: list[Arm]) -> None:
    """Every arm's quantizers against every layer's dims, on a meta-device model (free)."""
    for arm in arms:
        with torch.device("meta"):
            net = Llama(cfg)
        if arm.framework == "ours":
            try:
                arm.prepare(net)
            except ValueError as err:
                raise ValueError(f"arm {arm.name}: {err}") from None
        elif arm.framework == "torchao":
            for name, m in net.named_modules():
                if block_linear(m, name) and m.in_features % GROUP:
                    raise ValueError(f"arm {arm.name}: group size {GROUP} does not divide the input dim {m.in_features} of layer {name}")


def check_args(args: argparse.Namespace) -> list[Arm]:
    for key in ("steps", "batch_size", "val_batches", "seed"):
        minimum = {"steps": 2, "seed": 0}.get(key, 1)
        if getattr(args, key) < minimum:
            why = " (the first step is not timed)" if key == "steps" else ""
            raise ValueError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= {minimum}{why}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len={args.seq_len} must be >= 2 (a window predicts its next tokens)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr={args.lr} must be a finite number > 0")
    if args.warmup_steps is not None and not 1 <= args.warmup_steps <= args.steps:
        raise ValueError(f"--warmup-steps={args.warmup_steps} must be in [1, --steps={args.steps}]")
    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"--model={args.model!r} is not a save_pretrained directory (no config.json)")
    if not Path(args.data).exists():
        raise ValueError(f"--data={args.data!r} does not exist")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out={args.out!r} exists and is not a directory")
    arms = selected_arms(args.arms)
    if any(arm.framework == "torchao" for arm in arms):
        import_torchao()
    return arms


# ---------------------------------------------------------------- data


def data_batches(args: argparse.Namespace, tokenizer) -> tuple[list, list]:
    """(the --steps training batches, the --val-batches held-out batches), each (x, y), built
    once with the repo's data module (data=local) and handed to every arm as they are."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=["data=local"]), resolve=True)["data"]
    # Set after composing: a path is a value here, never parsed as override syntax.
    cfg.update(path=str(Path(args.data).resolve()), seq_len=args.seq_len, batch_size=args.batch_size, val_batches=args.val_batches, seed=args.seed)
    dm = build_datamodule(cfg, tokenizer, stage="fit")  # a bad corpus: one line naming data.* (FLAGS maps it)
    train = [(x.clone(), y.clone()) for x, y in islice(dm.train_dataloader(), args.steps)]
    val = [(x.clone(), y.clone()) for x, y in dm.val_dataloader()]
    return train, val


# ---------------------------------------------------------------- one arm


def run_arm(arm: Arm, args: argparse.Namespace, tokenizer, train: list, val: list, context: dict) -> ArmRow:
    torch.manual_seed(args.seed)
    net = load_hf_llama(args.model, vocab_size=tokenizer.vocab_size)
    arm.prepare(net)
    reference = context["reference"]  # the unadapted 16-bit model: every arm's KL, the kd arms' teacher
    start = agreement(net, reference, val)
    warmup = args.warmup_steps or max(1, round(0.1 * args.steps))
    stats = train_arm(net, train, args.lr, warmup, seed=args.seed, teacher=reference if arm.loss == "kd" else None)
    end = agreement(net, reference, val)
    before, after = start["ppl"], end["ppl"]
    converted, converted_mib = math.nan, math.nan
    if arm.convert is not None:
        real = arm.convert(net, context)
        converted_mib = stored_bytes(real) / MIB
        converted = perplexity(real, val)
        del real
    del net
    gc.collect()
    return ArmRow(
        arm=arm.name, framework=arm.framework, what=arm.what, loss=arm.loss, ppl_before=before, ppl_after=after,
        kl_before=start["kl_mean"], kl_after=end["kl_mean"], top1_after=end["same_top1"], ppl_converted=converted,
        converted_form=arm.converted_form, seconds_per_step=stats.seconds_per_step, ratio_to_unquantized=math.nan,
        peak_mib=stats.peak_bytes / MIB, converted_mib=converted_mib, steps=len(train), final_train_loss=stats.losses[-1],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained Llama directory (with tokenizer.json)")
    p.add_argument("--data", required=True, help="a text / JSONL / parquet corpus, or a folder of them (data=local)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per arm (>= 2; the first is not timed)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5, model=hf's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 10%% of --steps, at least 1)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches (the data module's val split)")
    p.add_argument("--seed", type=int, default=0, help="data order and torch seed, the same for every arm")
    p.add_argument("--arms", nargs="+", default=list(ARMS), help=f"subset of: {', '.join(ARMS)} (space- or comma-separated)")
    p.add_argument("--out", required=True, help=f"directory for {CSV_NAME} and {PLOT_NAME}")
    args = p.parse_args(argv)
    try:
        arms = check_args(args)
        tokenizer = checkpoint_tokenizer(args.model)
        cfg, _ = check_checkpoint(args.model, seq_len=args.seq_len, vocab_size=tokenizer.vocab_size)  # headers only
        check_layers(cfg, arms)
        train, val = data_batches(args, tokenizer)
    except ValueError as err:
        line = str(err).splitlines()[0]
        for key, flag in FLAGS.items():  # the data module and checkpoint checks name config keys
            line = line.replace(key, flag)
        print(f"error: {line}", file=sys.stderr)
        return 2

    versions = f"torch {torch.__version__}" + (f", torchao {import_torchao()}" if any(a.framework == "torchao" for a in arms) else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = sum(x.numel() for x, _ in train)
    print(f"{len(arms)} arms x {args.steps} steps ({tokens:,} train tokens, {sum(x.numel() for x, _ in val):,} held out); {versions}; "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    run = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()), "steps": args.steps, "lr": args.lr,
           "seq_len": args.seq_len, "batch_size": args.batch_size, "seed": args.seed}  # fmt: skip
    reference = load_hf_llama(args.model, vocab_size=tokenizer.vocab_size).eval().requires_grad_(False)
    context = {"out": out, "tokenizer": tokenizer, "run": run, "reference": reference}
    rows = []
    for arm in arms:
        started = time.perf_counter()
        rows.append(run_arm(arm, args, tokenizer, train, val, context))
        r = rows[-1]
        converted = f"{r.ppl_converted:.3f}" if math.isfinite(r.ppl_converted) else "n/a"
        print(f"{arm.name}: ppl {r.ppl_before:.3f} -> {r.ppl_after:.3f} (converted {converted}), KL {r.kl_before:.4f} -> {r.kl_after:.4f}, "
              f"same top-1 {r.top1_after:.2f}%, "
              f"{r.seconds_per_step:.4f} s/step, {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    base = next((r.seconds_per_step for r in rows if r.framework == "none"), math.nan)
    for r in rows:
        r.ratio_to_unquantized = r.seconds_per_step / base
    print(markdown(rows), end="")
    write_csv(out / CSV_NAME, rows)
    plot_perplexity(out / PLOT_NAME, rows, f"{Path(args.model).name}: {args.steps} steps of {args.batch_size}x{args.seq_len} tokens, lr {args.lr:g}; {versions}")
    print(f"wrote {out / CSV_NAME} and {out / PLOT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
