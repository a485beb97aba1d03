"""Resuming a checkpoint in another layout (DP, TP, PP, ZeRO stage), optimizer state included.

The checkpoint is first converted into a layout-free form, cached beside it as `universal/`: one
safetensors file per parameter of the plain model, holding its full fp32 master and AdamW's two
moments (vocabulary unpadded), with a manifest of its own. This is DeepSpeed's universal-checkpoint
idea (`ds_to_universal`: per-parameter fp32 / exp_avg / exp_avg_sq) in safetensors and under the
plain model's names, so one cache serves every target layout, ZeRO-0 and pipelines included. Every
rank converts a share of the parameters (read through `deepspeed_reader`, the reader of any layout).

Loading then gives each live parameter of the new engine its slice (vocabulary padded for the new
TP degree, split along the TP plan's dimension) through DeepSpeed's tensor-fragment API
(`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`, via `pretrain.deepspeed_compat`), which reaches the fp32 partitions
of ZeRO 1-3 and of the bf16 optimizer; the module's own (possibly bf16) weights are set to the same
values; with ZeRO-0 in fp32 the module weights are the masters and the moments go into torch's AdamW.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from pretrain import deepspeed_compat as compat
from pretrain.checkpoint.agreement import StepAgreement
from pretrain.checkpoint.files import fsync_dir, write_bytes_durably
from pretrain.checkpoint.manifest import FileEntry, Manifest, check_sizes, read_manifest, write_manifest
from pretrain.checkpoint.resume import ResumePoint
from pretrain.config import Config
from pretrain.errors import CheckpointError
from pretrain.model.names import VOCAB_PARAMETERS, layer_parameters
from pretrain.parallel.pipeline import plain_parameter_name
from pretrain.parallel.tensor_parallel import shard
from pretrain.parallel.topology import ParallelContext
from pretrain.parallel.tp_plan import partition_dim

CACHE_DIR = "universal"
KINDS = ("fp32", "exp_avg", "exp_avg_sq")


def _cache_is_complete(cache: Path) -> bool:
    try:
        check_sizes(cache, read_manifest(cache))
    except CheckpointError:
        return False
    return True


def ensure_universal(point: ResumePoint, agreement: StepAgreement, rank: int, world_size: int) -> Path:
    """The checkpoint's layout-free cache, converted now (by all ranks together) if not there yet."""
    cache = point.folder / CACHE_DIR
    if agreement.broadcast(_cache_is_complete(cache) if rank == 0 else None):
        return cache
    partial = point.folder / f".{CACHE_DIR}.partial"
    problem = None
    if rank == 0:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        except OSError as e:
            problem = f"cannot write the resharding cache beside the checkpoint ({e}); copy {point.folder} somewhere writable and resume from there"
    problem = agreement.broadcast(problem)
    if problem:
        raise CheckpointError(problem)

    report: dict[str, FileEntry] | str
    try:
        report = _convert_share(point, partial, rank, world_size)
    except Exception as e:  # reported on every rank below
        report = f"rank {rank}: {e}"
    reports = agreement.gather(report)
    errors = [r for r in reports if isinstance(r, str)]
    if errors:
        raise CheckpointError(f"cannot reshard {point.folder}: {errors[0]}")
    if rank == 0:
        files = {name: entry for r in reports if isinstance(r, dict) for name, entry in r.items()}
        write_manifest(partial, Manifest(CACHE_DIR, point.step, files, world_size))
        fsync_dir(partial)
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
        fsync_dir(point.folder)
    agreement.barrier()
    return cache


def _convert_share(point: ResumePoint, out: Path, rank: int, world_size: int) -> dict[str, FileEntry]:
    """Write this rank's share of the parameters (dealt largest first to the least loaded rank)."""
    from pretrain.checkpoint.deepspeed_reader import DeepSpeedCheckpoint

    params = [(i, name, shape) for i, ps in layer_parameters(point.config.model) for name, shape in ps]
    loads, mine = [0] * world_size, []
    for index, name, shape in sorted(params, key=lambda p: -p[2].numel()):
        owner = loads.index(min(loads))
        loads[owner] += shape.numel()
        if owner == rank:
            mine.append((index, name, shape))
    checkpoint = DeepSpeedCheckpoint(point.folder, point.config)
    entries = {}
    for index, name, shape in mine:
        tensors = {kind: checkpoint.tensor(index, name, shape, kind).contiguous() for kind in KINDS}
        file = f"{name}.safetensors"
        size, checksum = write_bytes_durably(out / file, save(tensors))
        entries[file] = FileEntry(size, checksum)
    return entries


def local_slice(full: torch.Tensor, name: str, cfg: Config, ctx: ParallelContext) -> torch.Tensor:
    """This rank's piece of the plain model's tensor `name`: vocabulary padded, TP-split."""
    if name in VOCAB_PARAMETERS and full.shape[0] < cfg.padded_vocab_size:
        full = torch.cat([full, full.new_zeros(cfg.padded_vocab_size - full.shape[0], *full.shape[1:])])
    dim = partition_dim(name)
    if dim is not None and ctx.tp > 1:
        return shard(full, dim, ctx.tp_rank, ctx.tp)
    return full


def load_universal(ds_engine: Any, cfg: Config, ctx: ParallelContext, cache: Path, adam_step: int) -> None:
    """Give every live parameter of `ds_engine` its fp32 master, module weight and moments from `cache`."""
    expected = {name for _, ps in layer_parameters(cfg.model) for name, _ in ps}
    compat.create_optimizer_state(ds_engine.optimizer, adam_step)
    for module_name, param in ds_engine.module.named_parameters():
        name = plain_parameter_name(cfg.model, module_name, ctx.pp > 1)
        if name not in expected:
            raise CheckpointError(f"the model has a parameter {module_name} ({name}) the checkpoint does not")
        with safe_open(str(cache / f"{name}.safetensors"), framework="pt") as f:
            for kind in KINDS:
                value = local_slice(f.get_tensor(kind), name, cfg, ctx)
                compat.set_full_state(ds_engine, param, kind, value, adam_step)
    compat.set_adam_step(ds_engine.optimizer, adam_step)
