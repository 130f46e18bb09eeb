"""Train a (quantized) Llama: `python train.py [group=option ...] [key=value ...]`.

The lifecycle, in this order and nowhere else:

    0. checks      every config fact once (run schema, quantizers, batch shape, launch)
    1. data        tokenizer, data module; text tokenized once into a cache
    2. model       the plain Llama (on the meta device for large sizes, then initialised)
    3. quantize    nn.Linear -> QuantLinear (build_net does 2 and 3: one builder for all);
                   lora=...: adapters on the frozen base, after init_from's weights (qat/train/lora.py)
    4. compile     optional, after quantization (state-dict keys stay the plain model's)
    5. module      the LightningModule receives the net, optimizer and scheduler partials
    6. trainer     checkpoints (atomic), telemetry callback, run record
    7. fit         resuming from the run's newest valid checkpoint, then a final validation
    8. results     results.json, and a summary line

See README.md for the config groups.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import NamedTuple

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from qat.models.llama import flops_per_token
from qat.quant.linear import set_held_scales
from qat.quant.rules import rules_dirname
from qat.train.checkpoint import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    AtomicCheckpointIO,
    config_differences,
    load_initial_weights,
    newest_checkpoint,
    remove_stale_temp_files,
)
from qat.train.distill import DistillConfig, Teacher, check_same_teacher, check_teacher, load_teacher, teacher_skeleton
from qat.train.identity import model_identity
from qat.train.faults import Diverged, DivergenceGuard, Interrupted, SignalCheckpoint
from qat.train.lifecycle import build_datamodule, build_net, check_model, layer_precisions, peak_lr, quantization_metadata, quantization_summary
from qat.train.lit_module import QATModule
from qat.train.lora import LoraConfig, add_adapters, base_source, check_same_base, lora_summary
from qat.train.run_config import (
    ConfigError,
    RunConfig,
    check_alignment_strategy,
    check_batch_shape,
    check_known_keys,
    check_launch,
    check_optimizer_and_trainer,
    check_scheduler,
    check_world_divides_batch,
    config_errors,
    hydra_error_line,
    override_key,
    quant_rules,
    quantizer_configs,
    StepBudget,
    resolve_max_steps,
    strategy_name,
    tokens_per_step,
)
from qat.train.run_record import EXIT_DIVERGED, RunRecord, StepRecorder, fail, is_completed, read_results
from qat.train.telemetry import QuantTelemetry, final_alignment

# The run directory names quant.rules by a digest (configs/train.yaml): the rules themselves
# are too long for a file name. Registered at import, before Hydra resolves hydra.run.dir.
OmegaConf.register_new_resolver(
    "rules_dirname", lambda dirname, rules: rules_dirname(dirname, OmegaConf.to_container(rules) if OmegaConf.is_config(rules) else rules), replace=True
)


def local_rank() -> int:
    """This process's rank on its node: torchrun and Lightning set LOCAL_RANK, srun SLURM_LOCALID."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


class Parts(NamedTuple):
    run: RunConfig
    module: QATModule
    datamodule: L.LightningDataModule
    budget: StepBudget
    resume_from: Path | None
    start_step: int
    init: dict | None  # init_from's record (None: the model's own init or a resume)
    teacher: Teacher | None  # distill=kd's frozen teacher (None: cross-entropy only)
    lora_base: dict | None  # a LoRA run's base identity (None: every weight trains)


def choose_resume(
    cfg: DictConfig, run_dir: Path, run: RunConfig, teacher: dict[str, str] | None = None, lora_base: dict[str, str] | None = None
) -> tuple[Path | None, int]:
    """The newest loadable checkpoint of this run directory (none with resume=false), checked
    to be of the same model, quantization, tokenizer and data as this command, distilled
    from the same teacher and adapting the same base (by content hash; `teacher` and `lora_base`
    are their identities, None without one)."""
    removed = remove_stale_temp_files(run_dir)
    if removed and local_rank() == 0:
        print(f"removed {len(removed)} temp file(s) of an interrupted write")
    found = newest_checkpoint(run_dir) if run.resume else None
    if found is None:
        return None, 0
    path, ckpt = found
    if teacher is not None:
        check_same_teacher(ckpt.get("distill_teacher"), teacher, path)
    if lora_base is not None:
        check_same_base(ckpt.get("lora_base"), lora_base, path)
    differ = config_differences(ckpt.get("config") or {}, OmegaConf.to_container(cfg, resolve=True))
    if differ:
        raise ConfigError(
            f"{path} was trained with a different {', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}; "
            "resume=false (or another run_name=) starts a new run"
        )
    return path, int(ckpt["global_step"])


def build(cfg: DictConfig, run_dir: Path, multirun: bool, overrides: Sequence[str] = ()) -> Parts | None:
    """Steps 0-5 of the lifecycle; None when the run is already completed and may be skipped."""
    # 0. Checks that cost nothing, each made once.
    check_known_keys(cfg)
    run = RunConfig.from_cfg(cfg)
    quantizer_configs(cfg)
    quant_rules(cfg)  # their shape; build_net below checks that every pattern matches a layer
    check_batch_shape(cfg)
    check_world_divides_batch(cfg)
    check_optimizer_and_trainer(cfg)
    check_scheduler(cfg)
    check_launch(cfg, multirun)
    check_model(cfg)  # a size-table row, or model=hf: a checkpoint directory we can load
    distill = DistillConfig.from_cfg(cfg)
    lora = LoraConfig.from_cfg(cfg)
    if lora.enabled and lora.lr is not None and "optimizer.lr" in {override_key(o) for o in overrides}:
        raise ConfigError(f"optimizer.lr is ignored with lora.lr={lora.lr:g} (a LoRA run's LR); set lora.lr=... instead, or lora.lr=null to use optimizer.lr")
    base_path = base_source(cfg.model, run.init_from) if lora.enabled else None  # nothing to adapt from scratch
    check_alignment_strategy(cfg, run, lora.enabled)
    tokenizer = instantiate(cfg.tokenizer)
    teacher_dir = check_teacher(distill, cfg.model, OmegaConf.select(cfg, "tokenizer.path"), tokenizer.vocab_size) if distill.enabled else None
    probe = build_net(cfg, tokenizer.vocab_size, device="meta")  # every layer's dims vs the quantizers, free
    if lora.enabled:
        add_adapters(probe, lora)  # every glob matches a layer, the rank fits every target; free
    budget = resolve_max_steps(cfg, probe.num_params(non_embedding=True), overrides)
    if run.skip_completed and is_completed(run_dir):
        print(f"skipping {run_dir}: results.json says completed")
        return None
    identity = model_identity(teacher_dir) if teacher_dir is not None else None
    base = None if base_path is None else identity if identity and Path(identity["path"]) == base_path else model_identity(base_path)
    resume_from, start_step = choose_resume(cfg, run_dir, run, identity, base)
    L.seed_everything(run.seed, workers=True, verbose=False)  # the seed is in results.json; stderr is for warnings and errors

    # 1. Data: tokenized once into a cache (rank 0 here; the other ranks then hit the cache).
    datamodule = build_datamodule(cfg.data, tokenizer, prepare=local_rank() == 0)

    # 2-3. The plain model (models/ knows nothing about quantization), then quantized.
    net = build_net(cfg, tokenizer.vocab_size)
    init = None
    if run.init_from and (resume_from is None or lora.enabled):  # a resumed run holds its weights; a LoRA run's base is init_from's
        init = load_initial_weights(net, run.init_from)
    set_held_scales(net)  # stored weight scales not in init_from: fitted to the weights now, before any wrapper
    adapted = add_adapters(net, lora) if lora.enabled else []  # after the base's weights: they are frozen as loaded
    if local_rank() == 0:
        print("\n".join(quantization_summary(net)))
        if init:
            print(f"initial weights from {init['path']} (step {init['step']}{', ' + init['ptq'] if init['ptq'] else ''})")
        if lora.enabled:
            print(lora_summary(net, lora, adapted, base))
        print(f"max_steps {budget.steps:,} from {budget.source}")

    # The frozen teacher (distill=kd): the 16-bit model, never quantized, trained or saved.
    # A LoRA run whose base is the teacher computes the teacher with the base's own frozen
    # tensors (no second copy), except under FSDP, which shards them.
    shared = base is not None and base is identity and distill.teacher_dtype == "float32" and "fsdp" not in strategy_name(cfg)
    teacher = None
    if teacher_dir and shared:
        teacher = Teacher(teacher_skeleton(teacher_dir, tokenizer.vocab_size), distill, identity, student=net)
    elif teacher_dir:
        teacher = Teacher(load_teacher(teacher_dir, tokenizer.vocab_size, distill.teacher_dtype), distill, identity)
    if teacher and local_rank() == 0:
        held = "the frozen base's own weights" if shared else distill.teacher_dtype
        print(f"distillation from {identity['path']} (sha256 {identity['sha256'][:12]}, {held}, T={distill.temperature:g}, ce_weight={distill.ce_weight:g})")

    # 4. Compile after quantization, in place (state-dict keys stay the plain model's).
    if run.compile:
        net.compile()

    # 5. The module receives its parts; the optimizer partial carries lr and weight decay.
    lr = cfg.optimizer.lr if cfg.optimizer.lr is not None else peak_lr(cfg.model)
    if lora.enabled and lora.lr is not None:  # adapters start at 0 and need ~10x a full fine-tuning LR
        lr = lora.lr
    module = QATModule(
        net,
        optimizer=instantiate(cfg.optimizer, lr=lr),
        scheduler=instantiate(cfg.scheduler),
        flops_per_token=flops_per_token(net.cfg, cfg.data.seq_len),
        extra_checkpoint={"config": OmegaConf.to_container(cfg, resolve=True)},
        teacher=teacher,
        lora_base=base,
    )
    return Parts(run, module, datamodule, budget, resume_from, start_step, init, teacher, base)


def train(cfg: DictConfig, run_dir: Path, multirun: bool = False, overrides: list[str] | None = None) -> dict:
    with config_errors():  # every bad override fails here, in one line, before training
        parts = build(cfg, run_dir, multirun, overrides or ())
    if parts is None:
        return read_results(run_dir)
    run, module, datamodule, budget, resume_from, start_step, init, teacher, lora_base = parts
    max_steps = budget.steps

    # 6. Trainer: checkpoints every N steps plus last, written atomically; telemetry; faults; record.
    every = run.checkpoint.every_n_steps
    final = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    trainer = instantiate(
        cfg.trainer,
        max_steps=max_steps,
        logger=instantiate(cfg.logger, save_dir=str(run_dir)),
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(
                dirpath=run_dir / CHECKPOINT_DIR,
                filename="step{step:07d}",
                auto_insert_metric_name=False,
                every_n_train_steps=every,
                save_top_k=-1 if run.checkpoint.keep_all else 0,
                save_last=True,
            ),
            QuantTelemetry(run.telemetry.every, run.telemetry.grad_alignment_every),
            DivergenceGuard(),
            SignalCheckpoint(str(final)),
        ],
    )
    net = module.net
    record = RunRecord(run_dir, cfg, layer_precisions(net), quantization_metadata(net), trainer.global_rank, overrides or [])
    record.update(non_embedding_params=net.num_params(non_embedding=True), total_params=net.num_params(non_embedding=False), max_steps=max_steps, max_steps_source=budget.source)
    if init:
        record.update(init_from=init)
    if teacher:
        record.update(distill_teacher=teacher.identity)
    if lora_base:
        record.update(lora_base=lora_base, trainable_params=sum(p.numel() for p in net.parameters() if p.requires_grad))
    trainer.callbacks.append(StepRecorder(record, tokens_per_step(cfg), every))

    # 7. Fit (resuming from the newest valid checkpoint of this run directory), then a final
    #    validation of the final weights (named explicitly: Lightning would otherwise pick up
    #    a SLURM requeue checkpoint).
    if trainer.is_global_zero:
        print(f"run directory {run_dir}" + (f"; resumed from step {start_step} ({resume_from})" if resume_from else ""))
    if resume_from:
        record.resumed_from(start_step)
    record.write("running")
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
        record.add_train_time(time.perf_counter() - started)
        trainer.save_checkpoint(final, weights_only=False)  # full state, so a longer re-run resumes
        if run.telemetry.final_grad_alignment:  # before validating: validation runs in inference mode
            record.update(grad_alignment=final_alignment(module.net, datamodule))
        metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=str(final), verbose=False, weights_only=True)[0]
    except Diverged as err:
        record.update(step=err.step, diverged_at_step=err.step)
        record.write("diverged")
        raise
    except Interrupted as err:
        record.add_train_time(time.perf_counter() - started)
        record.update(step=err.step, tokens=err.step * tokens_per_step(cfg))
        record.write("interrupted")
        raise
    except BaseException:
        record.write("failed")
        raise

    # 8. Results.
    train_time = record.data["train_time_s"]
    record.update(
        val_loss=float(metrics["val/loss"]),
        val_ppl=float(metrics["val/ppl"]),
        step=trainer.global_step,
        tokens=trainer.global_step * tokens_per_step(cfg),
        tokens_per_s=trainer.global_step * tokens_per_step(cfg) / train_time if train_time > 0 else None,
        loss_floor=datamodule.loss_floor,
        unigram_loss=datamodule.unigram_loss,
        checkpoint=str(final),
        **({"val_kl": float(metrics["val/kl"]), "val_top1_agree": float(metrics["val/top1_agree"])} if teacher else {}),
    )
    record.write("completed")
    if trainer.is_global_zero:
        print_summary(record.data)
    return record.data


def print_summary(r: dict) -> None:
    floor = f"{r['loss_floor']:.4f}" if r.get("loss_floor") is not None else "unknown"
    unigram = f"{r['unigram_loss']:.4f}" if r.get("unigram_loss") is not None else "unknown"
    speed = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "n/a"
    print(
        f"\n=== {r['model']} {r['precision']} ({r['quant_preset']}) after {r['step']} steps, {r['tokens']:,} tokens ===\n"
        f"val loss {r['val_loss']:.4f} | ppl {r['val_ppl']:.2f} | loss floor {floor} | unigram baseline {unigram}\n"
        + (f"val KL to the teacher {r['val_kl']:.4f} | same top-1 {100 * r['val_top1_agree']:.2f}%\n" if "val_kl" in r else "")
        + f"tokens/s {speed} | wall time {r['wall_time_s']:.1f} s | checkpoint {r['checkpoint']}\n"
        f"results {Path(r['run_dir']) / 'results.json'}"
    )


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return train(cfg, run_dir, multirun=hydra_cfg.mode == RunMode.MULTIRUN, overrides=list(hydra_cfg.overrides.task))
    except ConfigError as err:
        fail(str(err))
    except Diverged as err:
        fail(str(err), code=EXIT_DIVERGED)
    except Interrupted as err:
        fail(str(err), code=128 + err.signum)


def main_with_one_line_errors() -> None:
    """Hydra reports a bad group option or key (`quant=nope`, `checkpoint.foo=1`) on several lines
    with exit code 1; here it is one `error:` line and exit code 2, like every other bad input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises instead of printing
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        fail(hydra_error_line(err))


if __name__ == "__main__":
    main_with_one_line_errors()
