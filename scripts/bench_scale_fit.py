"""What each weight scale choice costs in a training step: every block linear's weight quantizer
of a model, forward and backward, per arm `scale:scale_update` (quant.weight.scale and
quant.weight.scale_update), with the rest of the preset as it is.

    python scripts/bench_scale_fit.py --model DIR --quant gguf_q4_0 \\
        --arms absmax:refit rms_mse:refit mse_search:refit absmax:frozen absmax:learned mse_search:learned \\
        --rounds 5 --step-seconds 9.2 --out bench_scale_fit

Only the weight quantizers differ between arms, so only they are timed: one pass quantizes
every block linear's weight (the model's shapes from --model, a directory of model=hf or a
size-table name; random weights of std 0.02, the same for every arm) and back-propagates a
fixed random gradient through it. Each round runs every arm once, in turn, so that load from
other processes slows all arms alike; the median over --rounds is reported (the first round,
which fits the stored scales, is not counted). With --step-seconds (a training step of the same
preset, measured by scripts/bench_lora.py) each arm's extra time over the first arm is also
given as a share of that step. Writes OUT/bench_scale_fit.json and .md (atomically); bad input
is one `error:` line, before any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from qat.io import atomic_write_json, atomic_write_text  # noqa: E402
from qat.quant.config import SCALE_UPDATES  # noqa: E402
from qat.quant.linear import QuantLinear  # noqa: E402
from qat.quant.quantizer import Quantizer  # noqa: E402
from qat.quant.scales import SCALE_FITS  # noqa: E402
from qat.train.lifecycle import build_net, check_model  # noqa: E402
from qat.train.run_config import ConfigError, config_errors  # noqa: E402


def model_overrides(model: str) -> list[str]:
    if (Path(model) / "config.json").is_file():
        return ["model=hf", f"model.path={model}"]
    if Path(model).exists() or "/" in model:
        raise ConfigError(f"--model {model!r} is not a save_pretrained directory (no config.json) nor a size name (e.g. debug-xs)")
    return [f"model={model}"]


def parse_arm(text: str) -> tuple[str, str]:
    scale, _, update = text.partition(":")
    if scale not in SCALE_FITS or update not in SCALE_UPDATES:
        raise ConfigError(f"--arms {text!r} is not allowed; give scale:scale_update with scale in {', '.join(SCALE_FITS)} and scale_update in {', '.join(SCALE_UPDATES)}")
    return scale, update


def weight_layers(args: argparse.Namespace) -> list[QuantLinear]:
    """The block linears of the model on the meta device: shapes and resolved weight configs."""
    with config_errors(), initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        # No data is read: a short sequence passes the check against the model's context.
        cfg = compose("train", overrides=[*model_overrides(args.model), f"quant={args.quant}", "trainer=cpu", "data.seq_len=2"])
        check_model(cfg)
        net = build_net(cfg, instantiate(cfg.tokenizer).vocab_size, device="meta")
    layers = [m for m in net.modules() if isinstance(m, QuantLinear) and m.weight_quantizer.cfg.enabled]
    if not layers:
        raise ConfigError(f"--quant {args.quant} quantizes no weight; choose a preset with quantized weights (e.g. gguf_q4_0, quest)")
    return layers


def arm_quantizers(layers: list[QuantLinear], scale: str, update: str) -> list[Quantizer]:
    out = []
    for layer in layers:
        with config_errors():
            cfg = dataclasses.replace(layer.weight_quantizer.cfg, scale=scale, scale_update=update)
            quantizer = Quantizer(cfg)
        quantizer.hold_scale((layer.out_features, layer.in_features))
        out.append(quantizer)
    return out


def one_pass(quantizers: list[Quantizer], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for quantizer, weight, grad in zip(quantizers, weights, grads):
        weight.grad = None
        quantizer(weight).backward(grad)
    return time.perf_counter() - start


def markdown(rows: list[dict], step: float | None) -> str:
    head = "| arm | s per pass (median) | × first arm |" + (" extra, share of a step |" if step else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = rows[0]["seconds"]
    for r in rows:
        extra = f" {100 * (r['seconds'] - base) / step:+.1f}% |" if step else ""
        lines.append(f"| {r['arm']} | {r['seconds']:.3f} | {r['seconds'] / base:.2f} |{extra}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained Llama directory (model=hf) or a size name (debug-xs, ...)")
    p.add_argument("--quant", default="gguf_q4_0", help="the quant preset whose weight quantizers are timed (default gguf_q4_0)")
    p.add_argument("--arms", nargs="+", default=["absmax:refit", "rms_mse:refit", "mse_search:refit", "absmax:frozen", "absmax:learned"],
                   help="scale:scale_update per arm; the first is the reference (default absmax:refit ...)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, each running every arm once (default 5)")
    p.add_argument("--step-seconds", type=float, default=None, help="a training step of the preset (bench_lora.py), for the share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for bench_scale_fit.json and bench_scale_fit.md")
    args = p.parse_args(argv)
    try:
        arms = [parse_arm(a) for a in args.arms]
        if len(set(arms)) != len(arms):
            raise ConfigError(f"--arms {' '.join(args.arms)} repeats an arm")
        if args.rounds < 1:
            raise ConfigError(f"--rounds {args.rounds} is not allowed; give an integer >= 1")
        if args.step_seconds is not None and not args.step_seconds > 0:
            raise ConfigError(f"--step-seconds {args.step_seconds} is not allowed; give seconds > 0")
        layers = weight_layers(args)
        quantizers = {arm: arm_quantizers(layers, *arm) for arm in arms}
    except ConfigError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    weights = [(0.02 * torch.randn(m.out_features, m.in_features, generator=generator)).requires_grad_() for m in layers]
    grads = [torch.randn(m.out_features, m.in_features, generator=generator) for m in layers]
    seconds: dict[tuple[str, str], list[float]] = {arm: [] for arm in arms}
    for _ in range(args.rounds + 1):  # round 0 fits the stored scales and warms up
        for arm in arms:
            seconds[arm].append(one_pass(quantizers[arm], weights, grads))
    rows = [{"arm": f"{s}:{u}", "seconds": statistics.median(t[1:]), "rounds": t[1:]} for (s, u), t in seconds.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args.step_seconds)
    meta = dict(command=" ".join(["python", "scripts/bench_scale_fit.py", *(argv if argv is not None else sys.argv[1:])]),
                torch=torch.__version__, threads=torch.get_num_threads(), layers=len(layers),
                weights=sum(m.weight.numel() for m in layers), step_seconds=args.step_seconds)  # fmt: skip
    atomic_write_json(out / "bench_scale_fit.json", dict(meta, rows=rows))
    atomic_write_text(out / "bench_scale_fit.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
