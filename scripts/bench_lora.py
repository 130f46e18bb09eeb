"""Peak memory and step time of full QAT against LoRA-QAT (`lora=...`) on one pretrained model,
the same batch and the same quant preset, with a projection to larger Llamas.

    python scripts/bench_lora.py --model DIR --data corpus.jsonl --quant gguf_q4_0 quest \\
        --ranks 8 16 64 --distill kd --out bench_lora

Every arm (full QAT, then lora=default at each --ranks value) is built by train.py's own
build(): `experiment=qat_finetune model.path=DIR data.path=DATA quant=Q trainer=cpu` plus
`lora=default lora.rank=R`, `distill=kd` and --override. Its step is train.py's: the module's
training_step (cross-entropy, or the distillation loss against the frozen teacher), backward,
the run's optimizer (AdamW over the trainable parameters), zero_grad. The batch is the first
training batch at each --batch-sizes entry, the same for every arm.

Per arm and batch size:
- **peak memory**: the bytes resident before the profiled step (parameters and buffers, the
  teacher's, the optimizer state) plus the peak of torch.profiler's allocation trace over
  that step (gradients, activations, the fake-quantized weights saved for backward,
  temporaries). The profiled step is the second: the first creates AdamW's state, so only
  from the second on does that state live through a forward and backward;
- **seconds/step**: the median over steps 3..--steps (the first largest batch only), in wall
  time, or with `--clock cpu` in this process's CPU time: run with OMP_NUM_THREADS=1, that
  does not count time other processes take from it, so arms measured on a busy machine stay
  comparable.

From two batch sizes the peak splits into a part that grows with the batch and an intercept
that does not; the intercept per parameter projects to a 7B and a 70B Llama (built on the meta
device with the same adapters, for their exact trainable counts). The projection leaves out
activations, which depend on batch, sequence and checkpointing. Writes OUT/bench_lora.json and
OUT/bench_lora.md (atomically) and prints the table; bad input is one `error:` line, before
any model loads.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py's build(): the arms are what train.py would run

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qat.models.llama import Llama, LlamaConfig  # noqa: E402
from qat.inference.compare import memory_profile, profiled_peak_bytes, stored_bytes  # noqa: E402
from qat.io import atomic_write_json, atomic_write_text  # noqa: E402
from qat.quant.config import QuantizerConfig  # noqa: E402
from qat.quant.convert import quantize_model  # noqa: E402
from qat.train.lifecycle import build_net, check_model  # noqa: E402
from qat.train.lora import LoraConfig, add_adapters  # noqa: E402
from qat.train.optim import build_optimizer  # noqa: E402
from qat.train.run_config import ConfigError, config_errors  # noqa: E402

MIB = 2**20
GIB = 2**30
# The two Llamas of the projection (Llama-2's published shapes: the 7B with multi-head
# attention, the 70B with 8 KV heads), built on the meta device: no memory.
PROJECTED = {
    "7B": LlamaConfig(vocab_size=32000, n_layer=32, d_model=4096, n_head=32, n_kv_head=32, ffn_hidden=11008),
    "70B": LlamaConfig(vocab_size=32000, n_layer=80, d_model=8192, n_head=64, n_kv_head=8, ffn_hidden=28672),
}


@dataclass
class Measured:
    arm: str
    quant: str
    rank: int | None  # None: full QAT
    batch_size: int
    seq_len: int
    total_params: int
    trainable_params: int
    linear_params: int  # the block linears' weights (what QAT fake-quantizes)
    model_mib: float  # parameters and buffers (the frozen base included)
    teacher_mib: float
    optimizer_mib: float  # AdamW's state, after the first step
    step_peak_mib: float  # the profiled step's own allocations, at their peak
    peak_mib: float  # model + teacher + optimizer + step peak
    seconds_per_step: float | None  # None: batch sizes other than the first are not timed
    losses: list[float]


def arm_overrides(args: argparse.Namespace, quant: str, rank: int | None, batch_size: int) -> list[str]:
    out = ["experiment=qat_finetune", f"model.path={args.model}", f"data.path={args.data}", f"quant={quant}", "trainer=cpu"]
    out += [f"data.seq_len={args.seq_len}", f"data.batch_size={batch_size}", "trainer.accumulate_grad_batches=1", "data.val_batches=1", f"seed={args.seed}"]  # no validation here
    if args.distill != "none":
        out.append(f"distill={args.distill}")
    if rank is not None:
        out += ["lora=default", f"lora.rank={rank}"]
    return out + list(args.override)


def compose_config(overrides: list[str]):
    with config_errors(), initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def linear_params(net: torch.nn.Module) -> int:
    from qat.quant.linear import QuantLinear

    return sum(m.weight.numel() for m in net.modules() if isinstance(m, QuantLinear))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure(args: argparse.Namespace, quant: str, rank: int | None, batch_size: int, timed: bool) -> Measured:
    """Build one arm as train.py does, run --steps steps on one batch, and measure."""
    import train

    overrides = arm_overrides(args, quant, rank, batch_size)
    cfg = compose_config(overrides)
    with tempfile.TemporaryDirectory() as run_dir, config_errors():
        parts = train.build(cfg, Path(run_dir), multirun=False, overrides=overrides)
    module, dm = parts.module, parts.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    net = module.net
    net.train()
    optimizer = build_optimizer(net, module.optimizer_factory)
    teacher_bytes = stored_bytes(parts.teacher.net) if parts.teacher else 0

    def step() -> float:
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    losses, seconds, step_peak, optimizer_bytes = [], [], 0, 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: logging is a no-op
        for i in range(args.steps if timed else 2):
            if i == 1:
                optimizer_bytes = tensor_bytes(v for s in optimizer.state.values() for v in s.values())
                with memory_profile() as prof:
                    losses.append(step())
                step_peak = profiled_peak_bytes(prof)
                continue
            start = clock()
            losses.append(step())
            seconds.append(clock() - start)
    model_bytes = stored_bytes(net)
    measured = Measured(
        arm="full" if rank is None else f"lora r{rank}",
        quant=quant,
        rank=rank,
        batch_size=batch_size,
        seq_len=args.seq_len,
        total_params=sum(p.numel() for p in net.parameters()),
        trainable_params=sum(p.numel() for p in net.parameters() if p.requires_grad),
        linear_params=linear_params(net),
        model_mib=model_bytes / MIB,
        teacher_mib=teacher_bytes / MIB,
        optimizer_mib=optimizer_bytes / MIB,
        step_peak_mib=step_peak / MIB,
        peak_mib=(model_bytes + teacher_bytes + optimizer_bytes + step_peak) / MIB,
        seconds_per_step=statistics.median(seconds[1:]) if timed and len(seconds) > 1 else None,
        losses=losses,
    )
    del parts, module, net, optimizer, dm
    gc.collect()
    return measured


def projected_net(shape: LlamaConfig, quant: str, rank: int | None, args: argparse.Namespace) -> torch.nn.Module:
    """The projected Llama on the meta device, quantized with the arm's preset and adapted as the arm."""
    cfg = compose_config(arm_overrides(args, quant, rank, args.batch_sizes[0]))
    weight, activation = (QuantizerConfig.from_mapping(OmegaConf.to_container(cfg.quant[s], resolve=True)) for s in ("weight", "activation"))
    with torch.device("meta"):
        net = Llama(shape)
    quantize_model(net, weight, activation)
    if rank is not None:
        add_adapters(net, LoraConfig.from_cfg(cfg))
    return net


def projections(rows: list[Measured], args: argparse.Namespace) -> list[dict]:
    """Per arm: bytes per parameter of the resident state, and per linear weight of the
    batch-independent part of the step (the intercept of the step peak over batch size), applied
    to each projected Llama. Resident: every parameter at the measured width (4 bytes here:
    fp32 master weights), the teacher's copy per parameter (none where it shares the base), the
    optimizer state per trainable parameter."""
    out = []
    for quant in args.quant:
        for rank in [None, *args.ranks]:
            arm = [r for r in rows if r.quant == quant and r.rank == rank]
            if len({r.batch_size for r in arm}) < 2:
                continue
            (b0, p0), (b1, p1) = sorted((r.batch_size, r.step_peak_mib * MIB) for r in arm)[:2]
            per_row = (p1 - p0) / (b1 - b0)
            intercept = max(p0 - per_row * b0, 0.0)
            r = arm[0]
            weight_bytes = r.model_mib * MIB / r.total_params
            teacher_bytes = r.teacher_mib * MIB / r.total_params  # a copy per parameter; 0 where it shares the base
            optimizer_per_trainable = r.optimizer_mib * MIB / max(r.trainable_params, 1)
            step_per_linear = intercept / r.linear_params
            for name, shape in PROJECTED.items():
                net = projected_net(shape, quant, rank, args)
                total, trainable = sum(p.numel() for p in net.parameters()), sum(p.numel() for p in net.parameters() if p.requires_grad)
                linears = linear_params(net)
                gib = (total * (weight_bytes + teacher_bytes) + trainable * optimizer_per_trainable + linears * step_per_linear) / GIB
                out.append(dict(model=name, quant=quant, arm=r.arm, total_params=total, trainable_params=trainable, projected_gib=gib,
                                weight_bytes_per_param=weight_bytes, teacher_bytes_per_param=teacher_bytes, optimizer_bytes_per_trainable=optimizer_per_trainable,
                                step_bytes_per_linear_weight=step_per_linear, step_mib_per_sequence=per_row / MIB))  # fmt: skip
    return out


def markdown(rows: list[Measured], projected: list[dict]) -> str:
    lines = [
        "| preset | arm | batch | trainable params | model MiB | teacher MiB | optimizer MiB | step peak MiB | peak MiB | x full | s/step | x full |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        full = next(f for f in rows if f.quant == r.quant and f.rank is None and f.batch_size == r.batch_size)
        time_ratio = f"{r.seconds_per_step / full.seconds_per_step:.2f}" if r.seconds_per_step and full.seconds_per_step else ""
        lines.append(
            f"| {r.quant} | {r.arm} | {r.batch_size} × {r.seq_len} | {r.trainable_params:,} | {r.model_mib:,.0f} | {r.teacher_mib:,.0f} "
            f"| {r.optimizer_mib:,.0f} | {r.step_peak_mib:,.0f} | {r.peak_mib:,.0f} | {r.peak_mib / full.peak_mib:.2f} "
            f"| {f'{r.seconds_per_step:.2f}' if r.seconds_per_step else ''} | {time_ratio} |"
        )
    if projected:
        lines += ["", "| projected | preset | arm | parameters | trainable | GiB without activations |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {p['model']} | {p['quant']} | {p['arm']} | {p['total_params']:,} | {p['trainable_params']:,} | {p['projected_gib']:,.1f} |" for p in projected]
    return "\n".join(lines) + "\n"


def check_args(args: argparse.Namespace) -> None:
    """Every bad value in one line, before any model loads."""
    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model!r} is not a save_pretrained directory (no config.json); scripts/import_gguf.py makes one from a GGUF")
    if not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data!r} does not exist; give a .jsonl or .txt corpus (scripts/text_to_jsonl.py)")
    for name, values, least in (("--ranks", args.ranks, 1), ("--batch-sizes", args.batch_sizes, 1)):
        bad = [v for v in values if v < least]
        if bad:
            raise ConfigError(f"{name} {bad[0]} is not allowed; give integers >= {least}")
    if len(set(args.batch_sizes)) != len(args.batch_sizes):
        raise ConfigError(f"--batch-sizes {' '.join(map(str, args.batch_sizes))} repeats a value; give distinct sizes")
    if args.steps < 3:
        raise ConfigError(f"--steps {args.steps} is too few; at least 3 (step 1 creates the optimizer state, step 2 is profiled, 3.. are timed)")
    if args.seq_len < 2:
        raise ConfigError(f"--seq-len {args.seq_len} is not allowed; give an integer >= 2")
    for quant in args.quant:  # every arm composes and fits the model (a bad preset, override or rank: one line)
        for rank in [None, *args.ranks]:
            cfg = compose_config(arm_overrides(args, quant, rank, args.batch_sizes[0]))
            with config_errors():
                check_model(cfg)
                probe = build_net(cfg, instantiate(cfg.tokenizer).vocab_size, device="meta")
                if rank is not None:
                    add_adapters(probe, LoraConfig.from_cfg(cfg))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained Llama directory (model=hf), the frozen base")
    p.add_argument("--data", required=True, help="the corpus (data=local's data.path): the batch comes from its train split")
    p.add_argument("--quant", nargs="+", default=["gguf_q4_0", "quest"], help="quant presets (default gguf_q4_0 quest)")
    p.add_argument("--ranks", nargs="*", type=int, default=[8, 16, 64], help="LoRA ranks, each one arm beside full QAT (default 8 16 64)")
    p.add_argument("--distill", choices=["none", "kd"], default="kd", help="the loss: distill=kd (default, the recipe's) or cross-entropy")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 1], help="sequences per batch; the first is timed, two or more split the peak (default 4 1)")
    p.add_argument("--steps", type=int, default=6, help="steps per arm at the first batch size (default 6: 3..6 timed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="seconds/step in wall time (default) or this process's CPU time")
    p.add_argument("--override", nargs="*", default=[], help="more train.py overrides for every arm (e.g. quant.weight.group_size=64)")
    p.add_argument("--out", required=True, help="directory for bench_lora.json and bench_lora.md")
    args = p.parse_args(argv)
    try:
        check_args(args)
        torch.manual_seed(args.seed)
        rows = []
        for quant in args.quant:
            for rank in [None, *args.ranks]:
                for i, batch_size in enumerate(args.batch_sizes):
                    rows.append(measure(args, quant, rank, batch_size, timed=i == 0))
                    r = rows[-1]
                    print(f"{quant} {r.arm} batch {batch_size}: peak {r.peak_mib:,.0f} MiB" + (f", {r.seconds_per_step:.2f} s/step" if r.seconds_per_step else ""), flush=True)
        projected = projections(rows, args)
    except ConfigError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, projected)
    meta = dict(command=" ".join(["python", "scripts/bench_lora.py", *(argv if argv is not None else sys.argv[1:])]), torch=torch.__version__,
                threads=torch.get_num_threads(), clock=args.clock)  # fmt: skip
    atomic_write_json(out / "bench_lora.json", dict(meta, rows=[asdict(r) for r in rows], projected=projected))
    atomic_write_text(out / "bench_lora.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
