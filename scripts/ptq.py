"""Post-training quantization baselines: round-to-nearest (RTN) and GPTQ, written as checkpoints.

    python scripts/ptq.py --model HF_DIR --method rtn quant.bits=4 --out rtn-w4a4.ckpt
    python scripts/ptq.py --model HF_DIR --method gptq quant.bits=4 quant.weight.hadamard_block=full \
        quant.activation.hadamard_block=full data=local data.path=corpus.jsonl --calibration-batches 16 --out gptq.ckpt
    python scripts/ptq.py --ckpt RUN/checkpoints/last.ckpt --method gptq quant.activation.bits=16 --out gptq-w4a16.ckpt

The quantizers are the ones train.py builds from the same overrides (`quant=...`, `quant.bits=...`,
rules); `--model` is a save_pretrained Llama directory (model=hf), `--ckpt` a checkpoint whose
model, tokenizer and (unless overridden) quant and data settings are kept. RTN is the quantized
model as it is: every forward rounds each weight to its grid. GPTQ replaces each latent weight
by its error-compensated latent, calibrated on `--calibration-batches` batches of the TRAIN split
of the data config (block by block, in the rotated basis when a rotation is configured), and
stores the scale it rounds with (quant.weight.scale_update=frozen unless the command line sets
it), so that the forward, the exporters and `init_from=` keep every code it chose.

The output is an ordinary checkpoint (method and calibration recorded under "ptq"):
scripts/evaluate.py, export.py and export_hf.py read it, and `train.py init_from=OUT` starts QAT
from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qat.ptq.calibration import gptq_model, gptq_problem
from qat.train.checkpoint import checkpoint_file, load_initial_weights, read_checkpoint, write_model_checkpoint
from qat.quant.linear import set_held_scales
from qat.train.lifecycle import build_datamodule, build_net, check_model, quantization_summary
from qat.train.run_config import ConfigError, config_errors, override_key, quantizer_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("rtn", "gptq")
KEPT_FROM_CHECKPOINT = ("quant", "data")  # unless the command line names them


def run_config(model_dir: str | None, ckpt: str | None, overrides: list[str]) -> dict:
    """The resolved run config: train.yaml composed with the overrides (and model=hf for a
    directory); for a checkpoint, its model and tokenizer, and its quant/data unless overridden."""
    typed = {override_key(o).split(".")[0] for o in overrides}
    if ckpt is not None and typed & {"model", "tokenizer"}:
        raise ConfigError(f"--ckpt keeps its own model and tokenizer; drop the {sorted(typed & {'model', 'tokenizer'})[0]} override")
    saved = None
    if ckpt is not None:
        saved = read_checkpoint(Path(ckpt)).get("config")
        if not saved:
            raise ConfigError(f"--ckpt {ckpt!r} was not written by train.py or scripts/ptq.py (no config)")
        model_dir = saved["model"]["path"] if saved["model"].get("size") == "hf" else None
    # The model group first: quant presets read it (model=hf picks the full Hadamard block).
    extra = ["model=hf", f"model.path={model_dir}"] if model_dir is not None else [f"model={saved['model']['size']}"] if saved else []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=[*extra, *overrides]), resolve=True)
    if saved is not None:
        for key in ("model", "tokenizer", *(k for k in KEPT_FROM_CHECKPOINT if k not in typed)):
            cfg[key] = saved[key]
    return cfg


def keep_gptq_codes(cfg: dict, overrides: list[str]) -> bool:
    """GPTQ's result is its codes. A weight that refits its scale in every forward reproduces only
    part of them (on SmolLM2 at Q4_0, 94% per layer at worst, and a perplexity worse than RTN's), so
    GPTQ stores the scale it rounds with (quant.weight.scale_update=frozen), unless the command
    line sets scale_update or the weight cannot hold a scale. Returns whether it changed cfg."""
    weight = cfg["quant"]["weight"]
    given = "quant.weight.scale_update" in {override_key(o) for o in overrides}
    if given or weight.get("scale_update", "refit") != "refit" or weight.get("asymmetric") or weight.get("scale") == "lsq":
        return False
    weight["scale_update"] = "frozen"
    return True


def calibration_batches(cfg: dict, tokenizer, count: int) -> list[torch.Tensor]:
    """The first `count` batches of the data config's train split (a bad corpus: one ConfigError line)."""
    dm = build_datamodule(cfg["data"], tokenizer, stage="fit")
    return [x for x, _ in islice(dm.train_dataloader(), count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a save_pretrained Llama directory (model=hf)")
    source.add_argument("--ckpt", help="a checkpoint of train.py (or of this script)")
    p.add_argument("--method", required=True, help=f"{' | '.join(METHODS)}")
    p.add_argument("--out", required=True, help="checkpoint to write (replaced only when complete)")
    p.add_argument("--calibration-batches", type=int, default=16, help="GPTQ: batches of the data config's train split (default 16)")
    p.add_argument("--block", type=int, default=128, help="GPTQ: columns per lazy-update block")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening, a share of the mean Hessian diagonal")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("overrides", nargs="*", help="train.py overrides: quant=..., quant.bits=4, data=local data.path=...")
    args = p.parse_intermixed_args(argv)  # overrides may stand before and after the options
    try:
        if args.method not in METHODS:
            raise ValueError(f"--method={args.method!r} is not a method; use one of {', '.join(METHODS)}")
        if args.calibration_batches < 1 or args.block < 1 or not 0 <= args.damp < 1:
            raise ValueError(f"--calibration-batches={args.calibration_batches} and --block={args.block} must be >= 1 and --damp={args.damp} in [0, 1)")
        if Path(args.out).is_dir():
            raise ValueError(f"--out={args.out!r} is a directory; give the checkpoint file to write")
        if Path(args.out).exists() and not args.force:
            raise ValueError(f"--out={args.out!r} exists; pass --force to replace it")
        if args.model is not None and not Path(args.model, "config.json").is_file():
            raise ValueError(f"--model={args.model!r} is not a save_pretrained directory (no config.json)")
        if args.ckpt is not None:
            checkpoint_file(args.ckpt, "--ckpt")
        with config_errors():
            cfg = run_config(args.model, args.ckpt, args.overrides)
            kept = args.method == "gptq" and keep_gptq_codes(cfg, args.overrides)
            omega = OmegaConf.create(cfg)
            check_model(omega)
            quantizer_configs(omega)
            tokenizer = instantiate(omega.tokenizer)
            probe = build_net(omega, tokenizer.vocab_size, device="meta")  # every layer's dims vs the quantizers, free
            if args.method == "gptq" and (why := gptq_problem(probe)):
                raise ValueError(why)
            # The calibration text, tokenized before any weight is loaded: a corpus that is
            # missing, empty or smaller than one batch is refused here, not after the model.
            batches = calibration_batches(cfg, tokenizer, args.calibration_batches) if args.method == "gptq" else []
    except (ValueError, ConfigError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    net = build_net(omega, tokenizer.vocab_size)
    if args.ckpt is not None:
        load_initial_weights(net, args.ckpt)
    set_held_scales(net)  # scale_update frozen / learned: the weights' own fit (GPTQ rounds with it and keeps it)
    print("\n".join(quantization_summary(net)))
    if kept:
        print("GPTQ stores the scale it rounds with (quant.weight.scale_update=frozen), so the forward keeps its codes; "
              "quant.weight.scale_update=refit refits it in every forward")  # fmt: skip
    record: dict = {"method": args.method, "source": str(Path(args.model or args.ckpt).resolve())}
    if args.method == "gptq":
        reports = gptq_model(net, batches, block=args.block, damp=args.damp)
        record.update(
            calibration_tokens=sum(b.numel() for b in batches), block=args.block, damp=args.damp,
            layers={r.name: r._asdict() for r in reports},
        )  # fmt: skip
        rtn, gptq = (sum(getattr(r, k) for r in reports) / len(reports) for k in ("output_error_rtn", "output_error_gptq"))
        agreement = min(r.code_agreement for r in reports)
        print(f"GPTQ: mean relative output error {gptq:.4f} (RTN {rtn:.4f}); codes the forward reproduces: >= {agreement:.2%} per layer")
    record["seconds"] = time.perf_counter() - started
    write_model_checkpoint(args.out, net, cfg, ptq=record)
    print(json.dumps({"out": args.out, "method": args.method, "seconds": round(record["seconds"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
