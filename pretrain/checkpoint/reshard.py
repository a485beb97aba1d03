"""Resuming a checkpoint in another layout (DP, TP, PP, ZeRO stage), optimizer state included.

The checkpoint is first converted into a layout-free form, cached beside it as `universal/`: one
safetensors file per parameter of the plain model, holding its full fp32 master and AdamW's two
moments (vocabulary unpadded), with a manifest of its own. This is DeepSpeed's universal-checkpoint
idea (`ds_to_universal`: per-parameter fp32 / exp_avg / exp_avg_sq) in safetensors and under the
plain model's names, so one cache serves every target layout, ZeRO-0 and pipelines included. Every
rank converts a share of the parameters (read through `pretrain.convert`'s reader of any layout).

Loading then gives each live parameter of the new engine its slice (vocabulary padded for the new
TP degree, split along the TP plan's dimension) through DeepSpeed's tensor-fragment API
(`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`), which reaches the fp32 partitions
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

from pretrain.checkpoint.agreement import StepAgreement
from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.files import fsync_dir, write_bytes_durably
from pretrain.checkpoint.manifest import FileEntry, Manifest, check_sizes, read_manifest, write_manifest
from pretrain.checkpoint.resume import ResumePoint
from pretrain.config import Config
from pretrain.convert.consolidated import VOCAB_PARAMETERS, layer_parameters, plain_parameter_name
from pretrain.parallel.plan import partition_dim
from pretrain.parallel.tensor_parallel import shard
from pretrain.parallel.topology import ParallelContext

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
    from pretrain.convert.deepspeed_checkpoint import DeepSpeedCheckpoint

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
    _create_optimizer_state(ds_engine.optimizer, adam_step)
    for module_name, param in ds_engine.module.named_parameters():
        name = plain_parameter_name(cfg.model, module_name, ctx.pp > 1)
        if name not in expected:
            raise CheckpointError(f"the model has a parameter {module_name} ({name}) the checkpoint does not")
        with safe_open(str(cache / f"{name}.safetensors"), framework="pt") as f:
            for kind in KINDS:
                value = local_slice(f.get_tensor(kind), name, cfg, ctx)
                _set(ds_engine, param, kind, value, adam_step)
    _set_adam_step(ds_engine, adam_step)


def _set(ds_engine: Any, param: torch.nn.Parameter, kind: str, value: torch.Tensor, step: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(param.device)
    zero3 = hasattr(param, "ds_id")
    if zero3 or hasattr(param, "_hp_mapping"):  # ZeRO 1-3 and the bf16 optimizer keep fp32 partitions
        if kind != "fp32":
            safe_set_full_optimizer_state(param, value, kind)
            return
        safe_set_full_fp32_param(param, value)
        if zero3:
            _set_zero3_weight(param, value)
        else:
            param.data.copy_(value.view_as(param).to(param.dtype))
        return
    # torch's AdamW itself (fp32 without ZeRO): the module weight is the master
    if kind == "fp32":
        param.data.copy_(value.view_as(param))
        return
    state = ds_engine.optimizer.state[param]
    if "step" not in state:
        state["step"] = _step_tensor(ds_engine.optimizer, param, step)
    state[kind] = value.view_as(param).clone()


# Where DeepSpeed's optimizer wrappers keep this rank's flat fp32 partitions, one per parameter group:
# ZeRO 1-2, the bf16 optimizer, ZeRO-3.
_FLAT_PARTITIONS = (
    "single_partition_of_fp32_groups",
    "fp32_groups_flat_partition",
    "fp32_partitioned_groups_flat",
)


def _create_optimizer_state(optimizer: Any, step: int) -> None:
    """torch's AdamW creates its state at the first step; a resumed engine has taken none yet. Create
    it (zeros, overwritten next) for DeepSpeed's flat partitions and let DeepSpeed link each
    parameter's fragment of it, as it does after its first step."""
    base = getattr(optimizer, "optimizer", None)
    for attribute in _FLAT_PARTITIONS:
        if base is not None and hasattr(optimizer, attribute):
            for flat in getattr(optimizer, attribute):
                state = base.state[flat]
                if "exp_avg" not in state:
                    state.update(
                        step=_step_tensor(base, flat, step),
                        exp_avg=torch.zeros_like(flat),
                        exp_avg_sq=torch.zeros_like(flat),
                    )
            if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
                optimizer._hp_optimizer_states_linked = False
                optimizer._lazy_init_hp_params_optimizer_state()
            return


def _step_tensor(optimizer: Any, param: torch.Tensor, step: int) -> torch.Tensor:
    """AdamW's step counter as torch itself makes it (on the device for fused or capturable AdamW)."""
    on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    return torch.tensor(float(step), dtype=torch.float32, device=param.device if on_device else "cpu")


def _set_zero3_weight(param: Any, value: torch.Tensor) -> None:
    """ZeRO-3 keeps this rank's 1/dp of each weight (ceil-sized, zero-padded) in `ds_tensor`, and
    small persistent parameters whole in `param.data` as well."""
    import torch.distributed as dist

    flat = value.flatten().to(param.ds_tensor.dtype)
    size = param.ds_tensor.numel()
    start = dist.get_rank(group=param.ds_process_group) * size
    piece = flat[start : start + size]
    param.ds_tensor.data.zero_()
    param.ds_tensor.data[: piece.numel()].copy_(piece)
    if param.data.numel() == value.numel():
        param.data.copy_(value.view_as(param.data).to(param.data.dtype))


def _set_adam_step(ds_engine: Any, step: int) -> None:
    optimizer = ds_engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 wrappers hold torch's AdamW
    for state in base.state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step
