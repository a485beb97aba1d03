"""Resuming a checkpoint in another layout (DP, TP, PP, ZeRO stage), optimizer state included.

The checkpoint is first converted into a layout-free form, cached beside it as `universal/`: one
safetensors file per parameter of the plain model, holding its full fp32 master and AdamW's two
moments (vocabulary unpadded), with a manifest of its own. This is DeepSpeed's universal-checkpoint
idea (`ds_to_universal`: per-parameter fp32 / exp_avg / exp_avg_sq) in safetensors and under the
plain model's names, so one cache serves every target layout, ZeRO-0 and pipelines included. Every
rank converts a share of the parameters (read through `deepspeed_reader`, the reader of any layout).

Loading then gives each live parameter of the new engine its part, and reads from the cache only
that part (`cache_reader`: safetensors slices of a memory-mapped file): its TP slice (vocabulary
padded for the new TP degree, split along the TP plan's dimension), and of that, under ZeRO, only
what this rank's fp32 partition holds (DeepSpeed's tensor-fragment mapping, via
`pretrain.deepspeed_compat`). Per layout, what a rank reads of each parameter's TP slice:

| layout | fp32 master | Adam moments | module weight |
| --- | --- | --- | --- |
| ZeRO-3 | its 1/dp partition | its 1/dp partition | its shard, set from the master's partition; small persistent weights gathered from the partitions |
| ZeRO 1-2, bf16 optimizer | all (the module weights are replicated over DP) | its fragment (about 1/dp) | from the master |
| ZeRO-0, fp32 | all (it is the module weight) | all (torch's AdamW is replicated) | the master |

Under expert parallelism a rank's slice of a routed expert weight is its EP rank's experts (a range
of rows along the expert dimension), read like a TP slice; the cache holds every expert whole,
gathered from the EP ranks' ZeRO partition files. Persistent buffers (the MoE routers' balancing
bias) are one small file, `buffers.safetensors`, read whole by every rank.

So under ZeRO-3 the ranks together read the cache about once, not DP times; `last_cache_reads()`
gives the bytes this process read, which the resume's log line also reports.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from pretrain import deepspeed_compat as compat
from pretrain.checkpoint.agreement import StepAgreement
from pretrain.checkpoint.cache_reader import KINDS, CacheFile, CacheReads, TensorSlice
from pretrain.checkpoint.files import fsync_dir, write_bytes_durably
from pretrain.checkpoint.manifest import FileEntry, Manifest, check_sizes, read_manifest, write_manifest
from pretrain.checkpoint.resume import ResumePoint
from pretrain.config import Config
from pretrain.errors import CheckpointError
from pretrain.model.names import buffer_shapes, layer_buffers, layer_parameters
from pretrain.parallel.pipeline import plain_parameter_name
from pretrain.parallel.topology import ParallelContext

CACHE_DIR = "universal"
BUFFERS_FILE = "buffers.safetensors"  # the persistent buffers (MoE routers' bias), one small file
_last_reads: CacheReads | None = None


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
    layers = layer_buffers(point.config.model) if rank == 0 else []  # replicated, small: rank 0 writes them
    buffers = {name: checkpoint.buffer(i, name) for i, bs in layers for name, _ in bs}
    if buffers:
        size, checksum = write_bytes_durably(out / BUFFERS_FILE, save(buffers))
        entries[BUFFERS_FILE] = FileEntry(size, checksum)
    return entries


def last_cache_reads() -> CacheReads | None:
    """What this process's latest resharded resume read from the cache (None before one): what a
    benchmark prints as bytes read per rank against the cache's size."""
    return _last_reads


def load_universal(
    ds_engine: Any, cfg: Config, ctx: ParallelContext, cache: Path, adam_step: int
) -> CacheReads:
    """Give every live parameter of `ds_engine` its fp32 master, module weight and moments from
    `cache`, reading only the parts this rank holds; returns the bytes read."""
    global _last_reads
    expected = {name: tuple(shape) for _, ps in layer_parameters(cfg.model) for name, shape in ps}
    reads = CacheReads.of_cache(expected)  # the whole cache, whatever part this rank (or stage) loads
    compat.create_optimizer_state(ds_engine.optimizer, adam_step)
    with compat.Zero3Partitioned(ds_engine.optimizer):
        for module_name, param in ds_engine.module.named_parameters():
            name = plain_parameter_name(cfg.model, module_name, ctx.pp > 1)
            if name not in expected:
                raise CheckpointError(
                    f"the model has a parameter {module_name} ({name}) the checkpoint does not"
                )
            part = TensorSlice.of(name, expected[name], cfg, ctx)
            with CacheFile(cache, name, expected[name], reads) as file:
                _load_parameter(ds_engine, param, file, part, adam_step)
    compat.set_adam_step(ds_engine.optimizer, adam_step)
    _load_buffers(ds_engine, cfg, ctx, cache)
    _last_reads = reads
    return reads


def _load_buffers(ds_engine: Any, cfg: Config, ctx: ParallelContext, cache: Path) -> None:
    """The persistent buffers this rank's module holds (replicated: each is read whole)."""
    from safetensors import SafetensorError, safe_open

    expected = buffer_shapes(cfg.model)
    live = {}
    for module_name, buffer in ds_engine.module.named_buffers():
        name = plain_parameter_name(cfg.model, module_name, ctx.pp > 1)
        if name in expected:
            live[name] = buffer
    if not live:
        return
    path = cache / BUFFERS_FILE
    try:
        with safe_open(str(path), framework="pt") as file, torch.no_grad():
            for name, buffer in live.items():
                buffer.copy_(file.get_tensor(name).to(buffer.device, buffer.dtype))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({e}); delete {cache} and resume again to rebuild the resharding cache"
        ) from e


def _load_parameter(ds_engine: Any, param: Any, file: CacheFile, part: TensorSlice, adam_step: int) -> None:
    sharding = compat.optimizer_sharding(param)
    if sharding == "zero3":  # masters, moments and module weights: all partitioned, 1/dp each
        start, size = compat.zero3_partition(param)
        for kind in KINDS:
            compat.set_local_state(param, kind, file.flat(kind, part, start, size))
        return
    if sharding == "fragments":
        # ZeRO 1-2 replicate the module weights over data-parallel ranks, so each needs the whole
        # master (its TP slice) for them; the moments live only in this rank's fragment.
        compat.set_full_state(ds_engine, param, "fp32", file.whole("fp32", part), adam_step)
        piece = compat.fragment_range(param)
        if piece is not None:
            for kind in KINDS[1:]:
                compat.set_local_state(param, kind, file.flat(kind, part, *piece))
        return
    for kind in KINDS:  # torch's AdamW, replicated: every rank holds the whole TP slice of each
        compat.set_full_state(ds_engine, param, kind, file.whole(kind, part), adam_step)
