"""Framework comparisons (scripts/compare_torchao.py): one training loop, one evaluation and
one memory measure that every arm shares, and the report (Markdown, CSV, plot).

Nothing here knows a quantization framework. An arm hands in a model it has already
prepared (fake-quantized, or not at all); `train_arm` runs the same plain PyTorch loop on
it that it runs on every other arm, so the arms differ only in their layers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from qat.inference.agreement import AgreementMeter
from qat.inference.evaluation import loss_over
from qat.train.distill import kd_loss
from qat.io import atomic_write, atomic_write_text

Batch = tuple[torch.Tensor, torch.Tensor]  # (input ids, next-token targets), each [B, T]

MIB = 2**20
MEMORY_NOTE = (
    "peak_mib = parameters + buffers before training + the peak of the running sum of torch.profiler's "
    "CPU allocation trace over the first training step (gradients, AdamW state, activations, quantizer "
    "temporaries); converted_mib = the stored bytes of the converted model's parameters and buffers "
    "(tensor subclasses counted by their inner tensors); seconds_per_step = mean over steps 2..N"
)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps (step 0 already at 1/warmup),
    then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup + 1) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def stored_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, each storage once (tied weights),
    tensor subclasses (torchao's quantized weights) by the plain tensors they hold."""
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        if t.device.type == "meta" or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    return sum(size(t) for t in itertools.chain(module.parameters(), module.buffers()))


def profiled_peak_bytes(prof: torch.profiler.profile) -> int:
    """The peak of live bytes allocated inside a profiled region: the running sum of the
    allocation (+) and free (-) events of a `profile_memory=True` trace, in time order."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def agreement(net: nn.Module, reference: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """llama.cpp's KL-divergence statistics of `net` against `reference` on the same batches
    (qat.inference.agreement); both modules' train/eval modes are restored."""
    modes = [(m, m.training) for m in (net, reference)]
    meter = AgreementMeter()
    try:
        net.eval(), reference.eval()
        with torch.no_grad():
            for x, y in batches:
                meter.update(net(x), reference(x), y)
    finally:
        for m, mode in modes:
            m.train(mode)
    return meter.result()


def perplexity(net: nn.Module, batches: Sequence[Batch]) -> float:
    """Token-weighted held-out perplexity; the module's train/eval mode is restored."""
    was_training = net.training
    net.eval()
    try:
        return loss_over(net, batches)["ppl"]
    finally:
        net.train(was_training)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints "USDT ... profiler_start/stop" there on every
    profile, and c10 a warning about blocks allocated before it). Python exceptions still
    propagate and print after the descriptor is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def memory_profile() -> Iterator[torch.profiler.profile]:
    """torch.profiler recording every CPU allocation and free (for `profiled_peak_bytes`)."""
    with quiet_native_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        yield prof


@dataclass
class TrainStats:
    seconds: list[float]  # per step, step 0 included
    losses: list[float]
    peak_bytes: int

    @property
    def seconds_per_step(self) -> float:
        """Mean over every step but the first (allocator, caches and lazy kernels warm up there)."""
        timed = self.seconds[1:]
        return sum(timed) / len(timed) if timed else math.nan


def train_arm(net: nn.Module, batches: Sequence[Batch], lr: float, warmup: int, seed: int = 0, teacher: nn.Module | None = None) -> TrainStats:
    """The one training loop of every arm: AdamW (weight decay 0), linear warm-up + cosine,
    next-token cross-entropy, or with a `teacher` distillation (KL(teacher || model) at T = 1,
    the loss of distill=kd), one optimizer step per batch, in the order given. The first
    step runs under the memory profiler (its time is not counted anyway)."""
    torch.manual_seed(seed)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    # The repo's AdamW betas (configs/optimizer/adamw.yaml); no weight decay: nothing to tune per arm.
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, len(batches), warmup))
    resident = stored_bytes(net)
    seconds, losses, peak = [], [], 0

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        logits = net(x)
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        else:
            with torch.no_grad():
                reference = teacher(x)
            loss = kd_loss(logits, reference)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for i, (x, y) in enumerate(batches):
        with contextlib.ExitStack() as stack:
            prof = stack.enter_context(memory_profile()) if i == 0 else None
            start = time.perf_counter()
            losses.append(step(x, y))
            seconds.append(time.perf_counter() - start)
        if prof is not None:
            peak = resident + profiled_peak_bytes(prof)
    return TrainStats(seconds, losses, peak)


# ---------------------------------------------------------------- the report


@dataclass
class ArmRow:
    arm: str
    framework: str
    what: str
    loss: str  # "ce" (next-token cross-entropy) | "kd" (distillation from the unadapted 16-bit model)
    ppl_before: float  # the (fake-quantized) model at step 0
    ppl_after: float  # after training, still fake-quantized
    kl_before: float  # mean per-token KL(unadapted 16-bit model || this model) at step 0
    kl_after: float  # ... after training
    top1_after: float  # same top-1 token as the unadapted 16-bit model after training, in %
    ppl_converted: float  # the framework's real low-bit form; nan where there is none
    converted_form: str
    seconds_per_step: float
    ratio_to_unquantized: float  # nan when the unquantized arm did not run
    peak_mib: float
    converted_mib: float
    steps: int
    final_train_loss: float


COLUMNS = [f.name for f in fields(ArmRow)]


def _cell(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def csv_text(rows: Sequence[ArmRow]) -> str:
    buf = io.StringIO()
    buf.write(f"# {MEMORY_NOTE}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([_cell(getattr(r, c), 6) if isinstance(getattr(r, c), float) else getattr(r, c) for c in COLUMNS])
    return buf.getvalue()


def markdown(rows: Sequence[ArmRow]) -> str:
    head = ["arm", "loss", "ppl before", "ppl after", "KL before", "KL after", "same top-1 %", "ppl converted", "converted to", "s/step", "x unquantized", "peak MiB", "converted MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.arm, r.loss, _cell(r.ppl_before), _cell(r.ppl_after), _cell(r.kl_before, 4), _cell(r.kl_after, 4), _cell(r.top1_after, 2),
                 _cell(r.ppl_converted) or "n/a", r.converted_form,
                 _cell(r.seconds_per_step, 4), _cell(r.ratio_to_unquantized, 2), _cell(r.peak_mib, 1), _cell(r.converted_mib, 2)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path, rows: Sequence[ArmRow]) -> None:
    atomic_write_text(path, csv_text(rows))


def plot_perplexity(path, rows: Sequence[ArmRow], title: str) -> None:
    """Per arm, held-out perplexity at step 0 (fake quant), after QAT and after conversion
    (log y: quantized arms can be far apart)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = (("ppl_before", "step 0 (fake quant)", "o"), ("ppl_after", "after QAT (fake quant)", "s"), ("ppl_converted", "converted (real low-bit)", "x"))
    for k, (key, label, marker) in enumerate(series):
        pts = [(i + (k - 1) * 0.15, getattr(r, key)) for i, r in enumerate(rows) if math.isfinite(getattr(r, key))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", marker=marker, label=label)
    ax.set_xticks(range(len(rows)), [r.arm for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    ax.grid(alpha=0.3, axis="y", which="both")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
