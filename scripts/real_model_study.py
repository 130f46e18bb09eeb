"""QAT against post-training quantization on a real Hugging Face Llama, one command per arm.

    python scripts/real_model_study.py --model smollm2-dir --data corpus.jsonl --out study --steps 30

Every arm runs as the user would run it (scripts/ptq.py, scripts/evaluate.py, train.py), on the
same held-out documents (`data=local`'s seeded split), and is timed with its peak memory (the
child's own rusage). Arms: the 16-bit model as loaded; RTN at W8A8, W4A16 and W4A4 with no
rotation, block 64 and full rotation, and W2A16 full; GPTQ at W4A16 and W4A4 (full rotation);
QAT (full rotation, trust) at W4A4 from RTN and from GPTQ, W4A4 with STE, W4A16 and W2A16,
each for --steps optimizer steps, and the same fine-tuning at 16 bits (QAT also adapts the model
to the corpus; this arm measures that part alone). `--arms` picks a subset (names as in the table); an arm whose
row is already in the CSV is skipped, so a killed study resumes. Writes <out>/results.csv and
<out>/results.md (the table), each rewritten atomically after every arm.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from qat.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
NO_ROTATION = ["quant.weight.rotation=none", "quant.weight.hadamard_block=128"]
BLOCK_64 = ["quant.weight.hadamard_block=64"]
W8A8, W4A16, W4A4, W2A16 = ["quant.bits=8"], ["quant.bits=4", "quant.activation.bits=16"], ["quant.bits=4"], ["quant.bits=2", "quant.activation.bits=16"]


class Arm(NamedTuple):
    name: str
    method: str  # "rtn" | "gptq" | "qat"
    quant: list[str]
    init: str | None = None  # a previous arm whose checkpoint a QAT arm starts from


ARMS = [
    Arm("16-bit", "rtn", ["quant=bf16"]),
    *(Arm(f"rtn-{p}-{r}", "rtn", q + rot) for p, q in (("w8a8", W8A8), ("w4a16", W4A16), ("w4a4", W4A4)) for r, rot in (("none", NO_ROTATION), ("h64", BLOCK_64), ("full", []))),
    Arm("rtn-w2a16-full", "rtn", W2A16),
    # The Gaussian-MSE scale clips a heavy-tailed row hard; without a rotation, absmax is the fair RTN.
    Arm("rtn-w8a8-none-absmax", "rtn", [*W8A8, *NO_ROTATION, "quant.weight.scale=absmax"]),
    Arm("rtn-w4a16-none-absmax", "rtn", [*W4A16, *NO_ROTATION, "quant.weight.scale=absmax"]),
    Arm("gptq-w4a16-full", "gptq", W4A16),
    Arm("gptq-w4a4-full", "gptq", W4A4),
    # The same fine-tuning at 16 bits: QAT adapts to the corpus too, and this arm separates that.
    Arm("finetune-16-bit", "qat", ["quant=bf16"]),
    Arm("qat-w4a4-full-from-rtn", "qat", W4A4),
    Arm("qat-w4a4-full-from-gptq", "qat", W4A4, init="gptq-w4a4-full"),
    Arm("qat-w4a4-full-ste-from-rtn", "qat", [*W4A4, "quant.weight.estimator=ste"]),
    Arm("qat-w4a16-full-from-rtn", "qat", W4A16),
    Arm("qat-w2a16-full-from-rtn", "qat", W2A16),
    # llama.cpp's Q4_0 / Q4_1, trained as the file stores them (scripts/gguf_study.py measures them
    # in llama.cpp). The presets' absmax scale (llama.cpp's own rule) clips nothing; the "-mse" arms
    # show why it is the default: without a rotation the MSE scale clips a pretrained model's outliers.
    *(Arm(f"{m}-gguf-{t}{s}", m, [f"quant=gguf_{t}", *(["quant.weight.scale=rms_mse"] if s else [])])
      for t in ("q4_0", "q4_1") for s in ("", "-mse") for m in ("rtn", "qat")),
]
# The config keys behind this script's flags (data_overrides), as its error lines name them.
FLAGS = {"data.seq_len": "--seq-len", "data.batch_size": "--batch-size", "data.val_batches": "--val-batches",
         "data.source.val_fraction": "--val-fraction", "data.path": "--data"}  # fmt: skip
FIELDS = ["arm", "method", "quant", "tokens_seen", "val_loss", "val_ppl", "wall_s", "eval_s", "peak_mem_gib", "command"]


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run cmd (its output to log); (wall seconds, peak resident GiB of that child alone)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed; see {log}")
    return time.perf_counter() - started, usage.ru_maxrss / 2**20


def data_overrides(args: argparse.Namespace) -> list[str]:
    """The one data config of every arm: the same documents, split and windows."""
    return [
        "data=local", f"data.path={args.data}", f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
        f"data.val_batches={args.val_batches}", f"data.source.val_fraction={args.val_fraction}",
    ]  # fmt: skip


def check_inputs(args: argparse.Namespace) -> None:
    """The model directory (config.json and tensor headers, no weights) and the corpus as every
    arm reads it (the model's tokenizer, the arms' data overrides), before the first arm starts:
    a corpus that is empty, not UTF-8 or too small for --batch-size is one ValueError line here.
    The corpus is tokenized into the token cache the arms then read (they run from the checkout)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from qat.train.lifecycle import build_datamodule, check_model
    from qat.train.run_config import config_errors

    with config_errors():
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=["model=hf", f"model.path={args.model}", *data_overrides(args)])
        check_model(cfg)
        tokenizer = instantiate(cfg.tokenizer)
    cache_dir = Path(os.path.expanduser(cfg.data.cache_dir))
    build_datamodule(cfg.data, tokenizer, cache_dir=str(cache_dir if cache_dir.is_absolute() else ROOT / cache_dir))


def arm_commands(arm: Arm, args: argparse.Namespace, out: Path) -> tuple[list[list[str]], Path]:
    """The commands of one arm and the checkpoint it ends with."""
    py = sys.executable
    data = data_overrides(args)
    if arm.method in ("rtn", "gptq"):
        ckpt = out / f"{arm.name}.ckpt"
        ptq = [py, str(ROOT / "scripts/ptq.py"), "--model", args.model, "--method", arm.method, "--out", str(ckpt), "--force", *arm.quant, *data]
        if arm.method == "gptq":
            ptq[4:4] = ["--calibration-batches", str(args.calibration_batches)]
        return [ptq], ckpt
    run_dir = out / arm.name
    train = [
        py, str(ROOT / "train.py"), "experiment=qat_finetune", f"model.path={args.model}", "trainer=cpu", *arm.quant, *data,
        f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}", "trainer.num_sanity_val_steps=0",
        "trainer.accumulate_grad_batches=1", "trainer.enable_progress_bar=false", f"optimizer.lr={args.lr}",
        f"checkpoint.every_n_steps={args.steps}", "checkpoint.keep_all=false", f"seed={args.seed}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    if arm.init:
        train.append(f"init_from={out / (arm.init + '.ckpt')}")
    return [train], run_dir / "checkpoints" / "last.ckpt"


def evaluate(ckpt: Path, args: argparse.Namespace, log: Path) -> tuple[float, float, float]:
    data = data_overrides(args)
    metrics = log.with_suffix(".json")
    seconds, memory = timed([sys.executable, str(ROOT / "scripts/evaluate.py"), "--ckpt", str(ckpt), "--out", str(metrics), *data], log)
    return json.loads(metrics.read_text())["val"]["loss"], seconds, memory


def table(rows: list[dict]) -> str:
    lines = ["| arm | tokens seen | val loss | val ppl | wall time (s) | eval (s) | peak memory (GiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {int(r['tokens_seen']):,} | {float(r['val_loss']):.4f} | {float(r['val_ppl']):.2f} | {float(r['wall_s']):.0f} "
            f"| {float(r['eval_s']):.0f} | {float(r['peak_mem_gib']):.1f} |"
        )
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    atomic_write_text(out / "results.md", table(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained Llama directory (scripts/import_gguf.py writes one)")
    p.add_argument("--data", required=True, help="a data=local file of documents (JSON lines, text, parquet)")
    p.add_argument("--out", required=True, help="study directory (checkpoints, logs, results.csv, results.md)")
    p.add_argument("--arms", nargs="+", default=None, help=f"a subset of: {' '.join(a.name for a in ARMS)}")
    p.add_argument("--steps", type=int, default=30, help="QAT optimizer steps per arm")
    p.add_argument("--lr", type=float, default=1e-4, help="QAT peak LR")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--val-fraction", type=float, default=0.02, help="held-out share of the documents")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = {a.name: a for a in ARMS}
    unknown = [a for a in args.arms or [] if a not in names]
    if unknown:
        print(f"error: --arms {unknown[0]!r} is not an arm; choose from {', '.join(names)}", file=sys.stderr)
        return 2
    for flag in ("steps", "seq_len", "batch_size", "val_batches", "calibration_batches"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1", file=sys.stderr)
            return 2
    if not Path(args.model, "config.json").is_file() or not Path(args.data).is_file():
        print(f"error: --model={args.model!r} must be a save_pretrained directory and --data={args.data!r} a file", file=sys.stderr)
        return 2
    args.model, args.data = str(Path(args.model).resolve()), str(Path(args.data).resolve())
    try:
        check_inputs(args)
    except ValueError as err:
        line = " ".join(str(err).split())
        for key, flag in FLAGS.items():  # the data module and checkpoint checks name config keys
            line = line.replace(key, flag)
        print(f"error: {line}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(out / "results.csv"))) if (out / "results.csv").is_file() else []
    done = {r["arm"] for r in rows}
    for arm in [names[a] for a in args.arms] if args.arms else ARMS:
        if arm.name in done:
            continue
        commands, ckpt = arm_commands(arm, args, out)
        wall, memory = 0.0, 0.0
        try:
            for cmd in commands:
                seconds, peak = timed(cmd, out / f"{arm.name}.log")
                wall, memory = wall + seconds, max(memory, peak)
            loss, seconds, peak = evaluate(ckpt, args, out / f"{arm.name}.eval.log")
        except RuntimeError as err:  # the arm's own error is in its log; the rows so far are kept
            print(f"error: arm {arm.name}: {err}", file=sys.stderr)
            return 1
        tokens = args.steps * args.batch_size * args.seq_len if arm.method == "qat" else args.calibration_batches * args.batch_size * args.seq_len if arm.method == "gptq" else 0
        rows.append({
            "arm": arm.name, "method": arm.method, "quant": " ".join(arm.quant), "tokens_seen": tokens, "val_loss": loss, "val_ppl": math.exp(loss),
            "wall_s": wall, "eval_s": seconds, "peak_mem_gib": max(memory, peak), "command": " ".join(Path(c).name if c == sys.executable else c for c in commands[0]),
        })  # fmt: skip
        write(rows, out)
        print(f"{arm.name}: val loss {loss:.4f} (ppl {math.exp(loss):.2f}), {wall:.0f} s + eval {seconds:.0f} s", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
