"""Assemble a Trainer from a validated Config: data, model, engine, checkpoints, callbacks, run directory."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint.signals import StopSignals
from pretrain.checkpoint.store import CheckpointStore
from pretrain.config import Config
from pretrain.data import DistributedBatches, TrainingData, load_training_data
from pretrain.data.checks import check_vocabulary
from pretrain.deepspeed_compat import version_warning
from pretrain.errors import ConfigError, OutputError
from pretrain.logs import get_logger, setup_logging
from pretrain.model import Transformer, active_parameters, count_parameters, flops_per_token
from pretrain.parallel import (
    DistInfo,
    ParallelContext,
    build_engine,
    build_parallel_context,
    parallelize_model,
    resolve_precision,
)
from pretrain.parallel.distributed import all_ranks_succeed, side_channel_barrier
from pretrain.parallel.topology import describe_layout
from pretrain.provenance import versions
from pretrain.train.callbacks import (
    Callback,
    ConsoleProgress,
    Evaluator,
    JsonlWriter,
    Plotter,
    ReplicaChecker,
    SavePolicy,
    TensorBoardWriter,
    ThroughputMonitor,
)
from pretrain.train.callbacks.moe import ExpertBalance
from pretrain.train.callbacks.nonfinite import NonFiniteGuard
from pretrain.train.memory import MemoryMarks, MemoryReport
from pretrain.train.mfu import peak_tflops
from pretrain.train.run_dir import check_run_dir, clear_run_outputs, truncate_metrics, write_run_files
from pretrain.train.trainer import Trainer
from pretrain.train.watchdog import Watchdog

__all__ = ["build_trainer", "check_run_dir", "run_summary"]

log = get_logger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_summary(cfg: Config, world_size: int, precision: str) -> dict[str, Any]:
    """Derived quantities, each with the numbers it came from: printed by --dry-run, saved with the run."""
    with torch.device("meta"):
        built = Transformer(cfg.model, cfg.padded_vocab_size)
    # Unique tensors (tied weights count once), less the zero rows that pad the vocabulary.
    padding = (cfg.padded_vocab_size - cfg.model.vocab_size) * cfg.model.hidden_size
    parameters = sum(p.numel() for p in built.parameters()) - padding * (1 if cfg.model.tie_embeddings else 2)
    assert parameters == count_parameters(cfg.model), "parameter formula disagrees with the built model"
    summary: dict[str, Any] = {
        "world_size": world_size,
        "data_parallel_size": cfg.data_parallel_size(world_size),
        "tensor_parallel_size": cfg.parallel.tp,
        "pipeline_parallel_size": cfg.parallel.pp,
        "grad_accum_steps": cfg.grad_accum_steps(world_size),
        "tokens_per_step": cfg.tokens_per_step,
        "total_tokens": cfg.tokens_per_step * cfg.train.steps,
        "precision": precision,
        "parameters": parameters,
        "active_parameters": active_parameters(cfg.model),
        "expert_parallel_size": cfg.parallel.ep,
        "padded_vocab_size": cfg.padded_vocab_size,
        "ffn_hidden_size": cfg.model.ffn_size,
        "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len),
        "versions": versions(),
    }
    if cfg.parallel.pp > 1:
        from pretrain.parallel.partition import partition_layers

        summary["pipeline_stage_boundaries"] = partition_layers(cfg)
    return summary


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def build_trainer(cfg: Config, dist: DistInfo, signals: StopSignals | None = None) -> Trainer:
    """Everything a run needs, resumed from its newest complete checkpoint when there is one.
    `signals`: stop-signal handlers installed earlier by the caller (else installed when fit starts)."""
    setup_logging(dist.rank)
    if dist.is_main and (note := version_warning()):
        log.warning(note)
    precision = resolve_precision(cfg.train.precision, dist.device)
    _check_precision(cfg, precision, dist)
    data = _load_data(cfg, dist)
    seed_everything(cfg.seed)
    ctx = build_parallel_context(cfg, dist.rank, dist.world_size)
    memory = MemoryMarks(dist.rank)
    model = parallelize_model(cfg, ctx, dist.device, precision)
    memory.mark_constructed()
    engine, ds_config = build_engine(cfg, model, dist.world_size, precision, ctx)
    memory.mark_built(cfg, dist.world_size, ctx.pp_rank, dist.device)
    summary = run_summary(cfg, dist.world_size, precision)
    summary["data"] = {**data.identity(), "eod_id": data.eod_id}

    run_dir = Path(cfg.run.dir)
    if dist.is_main and cfg.run.overwrite:
        clear_run_outputs(run_dir)
    side_channel_barrier()
    store = CheckpointStore(
        cfg,
        engine,
        dist.rank,
        dist.world_size,
        _layout(cfg, ctx, precision, dist.world_size),
        {"data": data.identity(), "versions": summary["versions"]},
        summary["parameters"],
        signals,
    )
    store.check_shared_storage()
    warning = store.space_warning() if dist.is_main else None
    if warning:
        log.warning(warning)
    callbacks = _callbacks(cfg, dist, summary, data, precision, store)
    callbacks.append(MemoryReport(memory, run_dir / "run_summary.json" if dist.is_main else None))
    trainer = Trainer(cfg, engine, *_batches(cfg, data, ctx, dist.device), dist, callbacks)
    resumed = _resume(cfg, store, trainer, data)
    trainer.unverified_resume = store.unverified_resume
    if dist.is_main:
        try:
            write_run_files(run_dir, cfg, {**summary, "resumed_from": resumed}, ds_config)
            truncate_metrics(run_dir / "metrics.jsonl", trainer.state.step)
        except OSError as e:
            raise OutputError(f"the run's files in {run_dir}", e) from e
    side_channel_barrier()
    return trainer


def _load_data(cfg: Config, dist: DistInfo) -> TrainingData:
    # Checksums are read once (rank 0); sizes and headers on every rank, which maps the shards anyway.
    data_cfg = dataclasses.replace(cfg.data, verify_checksums=cfg.data.verify_checksums and dist.is_main)
    data = all_ranks_succeed(lambda: load_training_data(data_cfg, cfg.train.seq_len))
    check_vocabulary(cfg.model.vocab_size, data.vocab_size, data.names)  # as --dry-run does
    return data


def _check_precision(cfg: Config, precision: str, dist: DistInfo) -> None:
    # What pretrain.config could not check while train.precision was 'auto' (build_engine checks it
    # too, for its other callers), here before any layer is built.
    if problems := cfg.parallel.data_type_problems(cfg.train, precision):
        raise ConfigError(problems)
    if precision == "fp16" and not _fp16_supported():
        raise ConfigError(
            [
                f"train.precision=fp16 is not supported on this {dist.device.type} device (DeepSpeed's CPU "
                f"accelerator needs oneDNN fp16 kernels: AVX512-FP16 / AMX-FP16); use train.precision=bf16 or fp32"
            ]
        )
    if precision == "bf16" and cfg.parallel.zero_stage == 0 and cfg.parallel.pp == 1:
        raise ConfigError(
            [
                "bf16 with parallel.zero_stage=0: DeepSpeed then accumulates and all-reduces gradients in bf16 "
                "(measured here: 1.5% loss drift from fp32 within 6 steps, against 0.02% with ZeRO-1). "
                "Use parallel.zero_stage=1 (on one process it costs no extra memory), or train.precision=fp32"
            ]
        )


def _layout(cfg: Config, ctx: ParallelContext, precision: str, world_size: int) -> dict[str, Any]:
    """What a checkpoint must match to be loaded natively (else it is resharded)."""
    return {
        "world_size": world_size,
        "dp": ctx.dp,
        "tp": ctx.tp,
        "pp": ctx.pp,
        "zero_stage": cfg.parallel.zero_stage,
        "precision": precision,
        "padded_vocab_size": cfg.padded_vocab_size,
        "pipeline_partition": cfg.parallel.pipeline_partition if ctx.pp > 1 else None,
        # Only for MoE models, so dense checkpoints written before these keys still load natively.
        **({"moe": True, "ep": ctx.ep} if cfg.model.moe.enabled else {}),
    }


def _batches(
    cfg: Config, data: TrainingData, ctx: ParallelContext, device: torch.device
) -> tuple[DistributedBatches, DistributedBatches | None]:
    t = cfg.train
    train = DistributedBatches(
        data.train,
        cfg.seed,
        t.global_batch_size,
        t.micro_batch_size,
        ctx.dp_rank,
        ctx.dp,
        weights=data.weights,
        # The next step is read while this one trains (validation reads a fixed set, rarely).
        prefetch=True,
        pin_memory=device.type == "cuda",
        vocab_size=data.vocab_size,
    )
    validation = None
    if t.eval_interval > 0 and all(len(v) > 0 for v in data.validation):
        validation = DistributedBatches(
            data.validation, cfg.seed, t.global_batch_size, t.micro_batch_size, ctx.dp_rank, ctx.dp,
            shuffle=False, weights=data.weights, vocab_size=data.vocab_size,
        )  # fmt: skip
    return train, validation


def _resume(
    cfg: Config, store: CheckpointStore, trainer: Trainer, data: TrainingData
) -> dict[str, Any] | None:
    point = None if cfg.run.overwrite else store.select(log.info)
    if point is None:
        return None
    notes = store.check_changes(point, data.identity())
    how = store.restore(point, trainer.run_state)
    log.info(f"resumed from {point.folder} (step {point.step}, {how})")
    for note in notes:
        log.info(f"  changed since the checkpoint: {note}")
    return {"checkpoint": str(point.folder), "step": point.step, "how": how, "changes": notes}


def _callbacks(
    cfg: Config,
    dist: DistInfo,
    summary: dict[str, Any],
    data: TrainingData,
    precision: str,
    store: CheckpointStore,
) -> list[Callback]:
    """The run's callbacks; the order they run in is their declared priority (callbacks.base)."""
    run_dir = Path(cfg.run.dir)
    peak = peak_tflops(dist.device, precision, cfg.logging.peak_tflops)
    callbacks: list[Callback] = [
        NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_events, store, precision),
        ThroughputMonitor(
            cfg.logging.interval, summary["flops_per_token"], peak, dist.world_size, data.names
        ),
        Evaluator(cfg.train.eval_interval),
        SavePolicy(store, cfg.checkpoint.interval, cfg.checkpoint.save_final),
        Watchdog.for_run(
            cfg.watchdog, run_dir, dist.rank, dist.world_size, store.save_clock, cfg.checkpoint.save_timeout
        ),
    ]
    if cfg.model.moe.enabled:  # a collective: on every rank
        moe = cfg.model.moe
        blocks = [f"blocks.{b}" for b in range(cfg.model.num_layers) if cfg.model.is_moe_block(b)]
        callbacks.append(ExpertBalance(cfg.logging.interval, blocks, moe.num_experts, moe.bias_update_rate))
    if cfg.parallel.check_replicas_interval > 0:  # a collective: on every rank
        callbacks.append(ReplicaChecker(cfg.parallel.check_replicas_interval))
    if dist.is_main:
        layout = describe_layout(
            summary["data_parallel_size"],
            cfg.parallel.tp,
            cfg.parallel.pp,
            cfg.parallel.zero_stage,
            ep=cfg.parallel.ep,
        )
        callbacks += [ConsoleProgress(summary, layout), JsonlWriter(run_dir / "metrics.jsonl")]
        if cfg.logging.tensorboard:
            callbacks.append(TensorBoardWriter(run_dir / "tensorboard"))
        if cfg.logging.plot:
            callbacks.append(Plotter(run_dir))
    return callbacks
