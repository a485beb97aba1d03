"""Process-group setup and the few collectives the training loop needs."""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pretrain.errors import PeerFailure, exit_code_of
from pretrain.logs import EVERY_RANK, get_logger

log = get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world_size() -> int:
    """The world size the launcher (srun, mpirun, torchrun, deepspeed) gives, from its variables alone."""
    from launch import env_world_size as from_env

    return from_env()


def _join_timeout() -> float:
    return float(os.environ.get("PRETRAIN_JOIN_TIMEOUT", "300"))


def init_distributed(join_timeout: float | None = None) -> DistInfo:
    """Join the process group described by the launcher's environment: srun (SLURM_*), mpirun
    (Open MPI, MPICH), torchrun or deepspeed (RANK, WORLD_SIZE, ...); a plain `python pretrain/main.py`
    becomes a world of one on loopback. `launch` resolves the variables (errors name the problem and
    the fix) and every rank checks in at rank 0 within `join_timeout` seconds (default
    $PRETRAIN_JOIN_TIMEOUT or 300), so a missing rank is named instead of waited for. Idempotent."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from launch import LaunchError, batch_shell_warning, init_process_group, join, resolve
    from pretrain import deepspeed_compat as compat

    accelerator = get_accelerator()
    if not dist.is_initialized():
        note = batch_shell_warning()
        if note:
            log.warning(note, extra=EVERY_RANK)
        info = resolve()
        if info.master_port == 0:
            info = dataclasses.replace(info, master_port=free_port())
        info.export()
        if accelerator.device_name() == "cuda" and info.local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"rank {info.rank} has LOCAL_RANK {info.local_rank} but {info.node} shows only "
                f"{torch.cuda.device_count()} GPUs (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                f"start one task per GPU (--ntasks-per-node equal to --gpus-per-node)"
            )
        store = join(info, _join_timeout() if join_timeout is None else join_timeout)
        _set_device(accelerator, info.local_rank, info.local_world_size)
        # DeepSpeed still calls torch.distributed functions that torch has renamed; those warnings are theirs.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
        init_process_group(info, store, accelerator.communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _set_device(accelerator, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cpu = accelerator.device_name() == "cpu"
    if cpu and local_rank == 0:
        for path in compat.remove_orphaned_shm_buffers():
            log.info(f"removed {path}, left by a killed CPU run (no process maps it)")
    # Wraps the existing group (no second rendezvous) so DeepSpeed's comm layer knows about it.
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False
    )
    if cpu:  # every rank has mapped its peers' shared-memory buffers once all have left the init
        dist.barrier()
        compat.unlink_shm_allreduce_buffer(dist.get_rank())
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _set_device(accelerator: Any, local_rank: int, local_world: int) -> torch.device:
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    # Several CPU ranks on one machine: give each its share of the cores instead of oversubscribing.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return torch.device("cpu")


def shutdown_distributed() -> None:
    """Destroy every process group; call only where all ranks are known to be alive and done with them."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over the ranks of `group` (default: all), returned as a new tensor."""
    out = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        out /= dist.get_world_size(group)
    return out


def all_ranks_succeed(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank and agree on the outcome (one all-reduce): if any rank raised, every
    rank raises (the failing ones their own error, the others PeerFailure carrying the failed ranks'
    highest exit code), instead of the healthy ranks hanging in the next collective until a timeout
    hides the real error."""
    error: BaseException | None = None
    result: T | None = None
    try:
        result = fn()
    except Exception as e:
        error = e
    code = torch.tensor([exit_code_of(error) if error else 0], device=collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if code.item() > 0:
        raise PeerFailure(int(code.item()))
    return result  # type: ignore[return-value]


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor sent over `group` (default: the world) must live: NCCL moves only CUDA memory
    (a CPU tensor fails with "No backend type associated with device type cpu"), gloo host memory."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
